"""The names and numbers profiling's parsers offer and its implementations
use, in a leaf module: profiling/cli.py imports nothing heavy (`iecl --help`
stays fast) and nothing imports the parser back."""

#: SAIB's dtypes, as train.step.DTYPES names them (tests/test_cli.py checks the two agree)
PRECISIONS = ("bf16", "fp16", "fp32")
#: bench saib's implementations
SAIB_IMPLS = ("reference", "compile", "triton")
#: compare's --saib choices, as compare.SAIB_MODES (checked likewise)
SAIB_CHOICES = ("both", "on", "off")
#: ImageNet-1k's training images: compare's default projected epoch
IMAGENET_TRAIN_IMAGES = 1_281_167
