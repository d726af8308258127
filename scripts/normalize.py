"""Snakemake wrapper: normalize one FP16 checkpoint (see quamba.models.checkpoint.normalize)."""

import logging
from pathlib import Path

from quamba.models.checkpoint import normalize

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,  # noqa: F821
                    format="%(asctime)s %(levelname)s %(message)s")
params = snakemake.params  # noqa: F821
logging.info("normalizing %s (tokenizer %s)", params.source, params.tokenizer)
out = normalize(params.source, params.tokenizer, Path(snakemake.output[0]))  # noqa: F821
logging.info("wrote %s", out)
