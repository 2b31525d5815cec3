"""Run configuration: dataclass sections loaded from TOML with ``--section.key=value`` overrides."""

from titan_rl.config.job_config import JobConfig
from titan_rl.config.loader import ConfigError, config_to_dict, load_config, parse_overrides, to_toml

__all__ = ["ConfigError", "JobConfig", "config_to_dict", "load_config", "parse_overrides", "to_toml"]
