from aprtui.cli import main

raise SystemExit(main())
