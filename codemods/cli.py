"""The ``mtp-migrate`` command line. Its commands arrive with the codemods."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mtp-migrate")
def main() -> None:
    """Migrate multi-token-prediction loss loops to weighted_mtp.utils, verified equivalent."""
