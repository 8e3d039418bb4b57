"""Default gates of the propagated verdicts, importable without numpy (the CLI's flags use them).

DEFAULT_THRESHOLD: the cosine below which a cell has diverged — apr's documented Q4_K noise
floor (contract apr-cli-trace-save-tensor-v1: cosine < 0.999 is the bisection threshold). Since
the noise floor (`engine.noise`) decides the verdict, this is information and an explicit gate.

DEFAULT_STD_BAND: std ratio A/B outside this band marks a scale divergence. Cosine is blind to
scale: a weight scaled ×18 leaves the cosine of its own output at 1.0, and only the residual add
after it shows the damage. Quantization noise at the cosine floor (0.999 ⇒ a relative error of
about 4.5%) moves the std by a few percent; a factor of 2 is far outside that, and still an
order of magnitude inside the 18× `ffn_swigl` signature seen in the seeds, a missing or doubled
norm weight, or a 1/hd instead of 1/sqrt(hd) attention scale.
"""

DEFAULT_THRESHOLD = 0.999
DEFAULT_STD_BAND = (0.5, 2.0)
