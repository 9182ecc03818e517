"""The run folder (runs.py): a run writes, moves and deletes only its own files, never through a symbolic link."""
import json
import signal

import pytest

from test_train import _no_figures, assets, run_train  # noqa: F401  (fixtures)


@pytest.fixture
def theirs(tmp_path):
    """A user's folder with a file in it, outside every run: no test may change either."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's notes")
    return folder


def unchanged(folder):
    return sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and (
        (folder / "notes.txt").read_text() == "the user's notes")


def link_in_place_of(out, name, target):
    """out/name becomes a symbolic link to `target`; what was there is moved out of the run."""
    if (out / name).exists():
        (out / name).rename(out.parent / f"was-{name}")
    (out / name).symlink_to(target)


def finished_run(assets, out):
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--eval_every", "1") == 0


def test_overwrite_with_a_linked_aside_folder_leaves_the_linked_folder_alone(assets, tmp_path, theirs):
    out = tmp_path / "out"
    finished_run(assets, out)
    (out / ".overwritten").symlink_to(theirs)
    assert run_train(assets, out, "--method", "zo", "--steps", "1", "--overwrite") == 0
    assert unchanged(theirs)
    assert not (out / ".overwritten").exists()


def test_a_linked_lock_is_replaced_not_truncated(assets, tmp_path, theirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(theirs / "notes.txt")
    assert run_train(assets, out, "--method", "zo", "--steps", "1") == 0
    assert unchanged(theirs)
    assert not (out / ".lock").is_symlink()


@pytest.mark.parametrize("name", ["results.json", "checkpoints", "model"])
def test_resume_refuses_an_output_that_is_a_link(assets, tmp_path, theirs, capsys, name):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--eval_every", "1") == 0
    target = theirs / "notes.txt" if name == "results.json" else theirs
    if name == "results.json":  # a link to a copy of the run's own results: still not the run's file
        (theirs / "notes.txt").write_text((out / name).read_text())
    link_in_place_of(out, name, target)
    before = {p: p.read_bytes() for p in theirs.iterdir()}
    capsys.readouterr()
    assert run_train(assets, out, "--method", "zo", "--steps", "4", "--eval_every", "1", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume:") and "symbolic link" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in theirs.iterdir()} == before


@pytest.mark.parametrize("name", ["results.json", "curves.png", "checkpoints", "model"])
def test_overwrite_unlinks_a_linked_output_and_keeps_its_target(assets, tmp_path, theirs, name):
    out = tmp_path / "out"
    finished_run(assets, out)
    link_in_place_of(out, name, theirs / "notes.txt" if name.endswith((".json", ".png")) else theirs)
    if name == "results.json":  # a link to a copy of the run's own results: --overwrite replaces the link
        (theirs / "notes.txt").write_text(json.dumps({"format": "dizo-train/1", "config": {}, "methods": {}}))
    before = (theirs / "notes.txt").read_text()
    assert run_train(assets, out, "--method", "zo", "--steps", "1", "--overwrite", "--save") == 0
    assert (theirs / "notes.txt").read_text() == before and sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    assert not (out / name).is_symlink()


def stop_at(monkeypatch, at):
    """SIGTERM arrives during step `at` of the next run."""
    import train
    original = train.take_step

    def interrupted(method, opt, closure, step):
        if step == at:
            signal.raise_signal(signal.SIGTERM)
        return original(method, opt, closure, step)

    monkeypatch.setattr(train, "take_step", interrupted)


def test_a_link_inside_a_checkpoint_is_not_written_through(assets, tmp_path, theirs, monkeypatch):
    out, flags = tmp_path / "out", ("--method", "zo", "--steps", "4", "--eval_every", "2")
    stop_at(monkeypatch, 3)
    assert run_train(assets, out, *flags) == 128 + signal.SIGTERM
    monkeypatch.undo()
    inside = out / "checkpoints" / "zo" / "tokenizer_config.json"
    (theirs / "notes.txt").write_text(inside.read_text())  # the same content, so the resume can read it
    inside.unlink()
    inside.symlink_to(theirs / "notes.txt")
    before = (theirs / "notes.txt").read_text()
    assert run_train(assets, out, *flags, "--resume") == 0
    assert (theirs / "notes.txt").read_text() == before
    assert not inside.is_symlink()  # the next checkpoint is a new folder of the run's own files


def test_a_signal_leaves_a_run_that_touched_nothing_else(assets, tmp_path, theirs, monkeypatch):
    out = tmp_path / "out"
    stop_at(monkeypatch, 2)
    out.mkdir()
    (out / ".lock").symlink_to(theirs / "notes.txt")
    assert run_train(assets, out, "--method", "zo", "--steps", "4") == 128 + signal.SIGTERM
    assert unchanged(theirs)
