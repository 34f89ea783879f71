"""The rlfleet CLI: a thin layer over the SDK.

Start-up stays cheap: subcommands are imported only when they run (``--help`` imports no
pydantic, Ray, torch or Pulumi). Errors print one line on stderr and exit non-zero; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

# name -> (module:attr, one-line help). Help lives here so `rlfleet --help` imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("rlfleet.cli.runs:run_cmd", "Submit a train, eval or deploy run."),
    "runs": ("rlfleet.cli.runs:runs_cmd", "List runs on a target."),
    "status": ("rlfleet.cli.runs:status_cmd", "Show a run's status."),
    "logs": ("rlfleet.cli.runs:logs_cmd", "Print (or follow) a run's logs."),
    "wait": ("rlfleet.cli.runs:wait_cmd", "Wait for a run to finish."),
    "cancel": ("rlfleet.cli.runs:cancel_cmd", "Cancel a run (no-op if it already ended)."),
    "artifacts": ("rlfleet.cli.runs:artifacts_cmd", "List a run's artifacts and check its manifest."),
    "endpoint": ("rlfleet.cli.runs:endpoint_cmd", "Show a deploy run's endpoint."),
    "deploy": ("rlfleet.cli.deployments:deploy_cmd", "Deploy, canary, promote or roll back a named deployment."),
    "deployments": ("rlfleet.cli.deployments:deployments_cmd", "List the named deployments of a target."),
    "undeploy": ("rlfleet.cli.deployments:undeploy_cmd", "Stop serving a named deployment."),
    "drift": ("rlfleet.cli.drift:drift_cmd", "Show a deployment's or deploy run's drift (PSI/KS, action shift)."),
    "local": ("rlfleet.cli.local:local_grp", "Start, stop or inspect the embedded local Ray head."),
    "target": ("rlfleet.cli.targets:target_grp", "List, add, show or remove targets."),
    "up": ("rlfleet.cli.infra:up", "Provision a target (Pulumi / Ansible / local)."),
    "down": ("rlfleet.cli.infra:down", "Tear a target down and prove nothing is left."),
    "cleanup": ("rlfleet.cli.infra:cleanup", "Prune old run artifacts by a retention rule."),
    "cost": ("rlfleet.cli.infra:cost", "Estimate a target's hourly and monthly cost."),
    "demo": ("rlfleet.cli.agents:demo", "The main job: train, evaluate and deploy CartPole locally."),
    "plot": ("rlfleet.cli.agents:plot", "Draw learning curves from runs' metrics."),
    "sweep": ("rlfleet.cli.sweeps:sweep_cmd", "Search hyperparameters with many train runs (resumable)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        mod_name, attr = entry[0].split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("rlfleet"):
                return _unavailable(cmd_name, str(err))
            raise
        return getattr(mod, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in sorted(COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str, why: str) -> click.Command:
    @click.command(name=name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def cmd(args: Any) -> None:
        from rlfleet.errors import RlfleetError

        raise RlfleetError(f"'{name}' is not available in this installation ({why})")

    return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option("0.1.0", prog_name="rlfleet")
def cli(debug: bool) -> None:
    """rlfleet: one run spec, any GPU fleet (local Ray, AWS, GCP, on-prem)."""
    if debug:
        os.environ["RLFLEET_DEBUG"] = "1"


def main(argv: list[str] | None = None) -> int:
    from rlfleet.errors import RlfleetError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("RLFLEET_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="rlfleet", standalone_mode=False)
        return 0
    except RlfleetError as err:
        if debug:
            raise
        click.echo(f"rlfleet: error: {err}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("rlfleet: aborted", err=True)
        return 130
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("rlfleet: interrupted", err=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
