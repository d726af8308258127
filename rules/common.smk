# Config validation at the door, and helpers shared by the rules.
from pathlib import Path

from snakemake.utils import validate

from quamba.errors import QuambaError
from quamba.models.checkpoint import check_source

validate(config, "../schemas/config.schema.yaml", set_default=True)

MODELS = sorted(config["models"])
CALIBRATIONS = sorted(config["calibrations"])


def _check_sources():
    """Every source is a local dir or a hub id, so a typo fails before any job runs."""
    for name, spec in config["models"].items():
        for key in ("source", "tokenizer"):
            if key in spec:
                try:
                    check_source(spec[key])
                except QuambaError as err:
                    raise ValueError(f"config: models.{name}.{key}: {err}") from None


_check_sources()


wildcard_constraints:
    model="|".join(MODELS),
    calib="|".join(CALIBRATIONS),


def calibration_setting(calib):
    """A calibration setting; validate() has filled in the schema's defaults."""
    return config["calibrations"][calib]


def model_source(model):
    return config["models"][model]["source"]


def model_tokenizer(model):
    spec = config["models"][model]
    return spec.get("tokenizer", spec["source"])


def local_model_files(wildcards):
    """The files of a local source, so editing them reruns normalization; none for hub ids."""
    source = Path(model_source(wildcards.model))
    if not source.is_dir():
        return []
    return sorted(str(p) for p in source.iterdir() if p.is_file())
