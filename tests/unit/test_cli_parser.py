"""The command line's parser: where options may go, and help for everything."""

import argparse

import pytest

from vdifs.cli.main import build_parser


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", [
    ("vdi", "-m", "/mnt/vdis", "list"), ("vdi", "list", "-m", "/mnt/vdis"),
    ("vdi", "--mount", "/mnt/vdis", "list"), ("vdi", "list", "--mount", "/mnt/vdis"),
])
def test_vdi_mount_before_or_after_the_action(argv):
    args = parse(*argv)
    assert (args.mount, args.store, args.vdi_command) == ("/mnt/vdis", None, "list")


@pytest.mark.parametrize("argv", [("vdi", "--store", "S", "list", "--json"), ("vdi", "list", "--store", "S", "--json"),
                                  ("vdi", "list", "--json", "--store", "S")])
def test_vdi_store_before_or_after_the_action(argv):
    args = parse(*argv)
    assert (args.mount, args.store, args.json) == (None, "S", True)


def test_vdi_without_a_mount_or_store():
    args = parse("vdi", "create", "a", "1G")
    assert (args.mount, args.store, args.size) == (None, None, 1 << 30)


def test_vdi_mount_and_store_exclude_each_other():
    with pytest.raises(SystemExit):
        parse("vdi", "list", "-m", "/m", "--store", "S")


@pytest.mark.parametrize("argv", [
    ("cluster", "--cluster", "h:1", "--secret-file", "s", "info"),
    ("cluster", "info", "--cluster", "h:1", "--secret-file", "s"),
    ("cluster", "--cluster", "h:1", "info", "--secret-file", "s"),
])
def test_cluster_options_before_or_after_the_action(argv):
    args = parse(*argv)
    assert (args.cluster, args.secret_file, args.cluster_command) == ("h:1", "s", "info")


def test_cluster_defaults():
    from vdifs.meta.credentials import default_secret_file

    args = parse("cluster", "status")
    assert (args.cluster, args.secret_file) == (None, default_secret_file())
    assert parse("cluster", "--secret-file", "s", "format", "h:1").secret_file == "s"


def test_negative_sizes_reach_the_size_check(capsys):
    with pytest.raises(SystemExit) as e:
        parse("vdi", "create", "neg", "-5G")
    assert e.value.code == 2 and "invalid size" in capsys.readouterr().err


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every command and action path of the parser."""
    yield prefix
    for action in parser._actions:  # argparse offers no public way to list subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, prefix + (name,))


def test_every_command_has_help(capsys):
    paths = list(commands(build_parser()))
    assert ("vdi", "export-diff") in paths and ("cluster", "check") in paths and ("peer",) in paths
    assert len(paths) > 30
    for path in paths:
        with pytest.raises(SystemExit) as e:
            parse(*path, "--help")
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith("usage: vdifs"), path
        assert len(out.split("\n\n")) >= 3, (path, out)  # usage, a description, options
