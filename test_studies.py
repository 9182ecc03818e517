"""studies.py over damaged or misnamed inputs: one line, and a run's files never replaced."""
import pytest
import studies
from test_dizo import _no_figures, assets, run_train  # noqa: F401



def test_ablate_never_writes_through_a_link_into_a_run(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save") == 0
    before = (out / "results.json").read_bytes()
    (tmp_path / "link.json").symlink_to(out / "results.json")
    with pytest.raises(SystemExit) as e:
        studies.main(["--ablate", str(out / "model"), "--base", assets["causal"], "--task", "sst-2",
                      "--data_dir", assets["data"], "--out", str(tmp_path / "link.json")])
    assert "would replace a file of the train.py run" in str(e.value.code)
    assert (out / "results.json").read_bytes() == before


def test_ablate_refuses_a_figure_name_as_its_json_report(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        studies.main(["--ablate", assets["causal"], "--out", str(tmp_path / "abl.png")])
    assert e.value.code == 2 and "ends in .json" in capsys.readouterr().err
    assert not (tmp_path / "abl.png").exists()


def test_ablate_on_a_run_folder_says_to_pass_its_model(assets, tmp_path):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save") == 0
    with pytest.raises(SystemExit) as e:
        studies.main(["--ablate", str(out), "--base", assets["causal"], "--task", "sst-2", "--data_dir",
                      assets["data"], "--out", str(tmp_path / "abl.json")])
    message = str(e.value.code)
    assert message.startswith("error: --ablate") and str(out / "model") in message and "--model" not in message


@pytest.mark.parametrize("content", ["{}", "[]", '{"methods": {"zo": 1}}', "not json"])
def test_paired_summary_over_a_damaged_run_names_it_in_one_line(tmp_path, content):
    run = tmp_path / "paired" / "full-zo-lr0.00015-s0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        studies.main(["--paired", str(tmp_path / "paired"), "--summary-only"])
    message = str(e.value.code)
    assert message.startswith("error: ") and str(run) in message and len(message.splitlines()) == 1
