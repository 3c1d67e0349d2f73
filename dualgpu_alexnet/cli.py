"""Command-line plumbing shared by the entry points in launch/: config options, exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import config as config_mod
from .comm import AgreedError, Comm, install_abort_on_exception, world
from .config import Config, ConfigError
from .runtime import blas_threads_for, set_blas_threads

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 130


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config PRESET and repeated --set section.key=value."""
    parser.add_argument("--config", default="alexnet2012", metavar="PRESET",
                        help="preset name in configs/ (" + ", ".join(config_mod.preset_names())
                        + ") or a path to a .toml file (default: alexnet2012)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        dest="overrides", help="override one config value, e.g. "
                        "--set optim.lr=0.02 (repeatable; see README for every key)")


def resolve_config(comm: Comm, preset: str, overrides: list[str],
                   saved_run: str | None = None) -> Config:
    """The run config on every rank: a preset + overrides, or a saved run's config.toml + overrides.

    The coordinator reads the file and broadcasts its text, so only it needs the file system.
    """
    text, error = "", ""
    if comm.is_coordinator:
        try:
            if saved_run:
                path = Path(saved_run) / "config.toml"
                if not path.is_file():
                    raise ConfigError(f"{saved_run} is not a run directory (no config.toml)")
                text = path.read_text()
                base = config_mod.from_toml_text(text)
            else:
                base = config_mod.load(preset)
            text = config_mod.apply_overrides(base, overrides).to_toml()
        except (ConfigError, OSError) as e:
            error = str(e)
    error = comm.bcast_text(error, "config")
    if error:
        raise ConfigError(error)
    return config_mod.from_toml_text(comm.bcast_text(text, "config"))


def run_main(body: Callable[[Comm], int]) -> int:
    """Run `body(comm)` with the job's communicator, turning known errors into exit codes.

    An unexpected exception on any rank ends every rank (traceback printed once, with the rank);
    bad input exits 2 with one message from the coordinator.
    """
    comm = world()
    install_abort_on_exception(comm.rank)
    try:
        return body(comm)
    except ValueError as e:
        agreed = isinstance(e, (ConfigError, AgreedError))  # raised on every rank alike
        if comm.is_coordinator or not agreed:
            where = f" (rank {comm.rank})" if not agreed and comm.size > 1 else ""
            print(f"error{where}: {e}", file=sys.stderr, flush=True)
        if comm.size > 1 and not agreed:
            os._exit(EXIT_BAD_INPUT)  # the other ranks may wait for this one: end the job
        return EXIT_BAD_INPUT


def configure_rank(comm: Comm, config: Config) -> int:
    """Per-rank set-up once the config is known: BLAS threads and the collective watchdog."""
    threads = set_blas_threads(blas_threads_for(config, comm))
    comm.start_watchdog(config.comm.watchdog_seconds)
    return threads
