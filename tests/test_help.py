"""`--help` is for people: every option says what it does, no `<bool>` placeholders, `--task` lists the tasks."""
import pytest
import typer.main
from typer.testing import CliRunner

from pkd_cache.cli import app
from pkd_cache.cli_options import TASK_NAMES
from pkd_cache.data.tasks import TASKS

COMMANDS = sorted(typer.main.get_command(app).commands)


def test_every_option_of_every_command_has_help():
    missing = [(name, p.opts[0]) for name, c in typer.main.get_command(app).commands.items() for p in c.params
               if p.param_type_name == "option" and not p.help]
    assert missing == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_without_placeholders_for_flags(command):
    r = CliRunner().invoke(app, [command, "--help"], terminal_width=100)
    assert r.exit_code == 0 and "<bool>" not in r.output, r.output
    if any(o in r.output for o in ("--task ", "--task,")):
        assert TASK_NAMES in " ".join(r.output.split()), r.output


def test_the_task_list_is_the_tasks_pkd_cache_knows():
    assert TASK_NAMES.split(", ") == list(TASKS)


def test_finetune_takes_max_examples_as_every_other_command_does():
    r = CliRunner().invoke(app, ["finetune", "--help"], terminal_width=100)
    assert "--max-train-samples, --max-examples" in r.output, r.output
