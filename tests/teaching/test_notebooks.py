"""The committed notebooks open clean in JupyterLab and store nothing a reader should not see.

Every course notebook carries the kernelspec and language_info that the installed ipykernel
writes (else JupyterLab marks it modified on open), no stderr, no error, no numpy repr or
float noise, finished progress bars; and bnlab.teaching.notebooks' checks catch each of those.
"""

from __future__ import annotations

import subprocess

import nbformat
import pytest

from bnlab.teaching import notebooks

COURSE = notebooks.course_notebooks()


def test_there_are_course_notebooks():
    assert len(COURSE) >= 8 and COURSE[0].name.startswith("01_")


@pytest.mark.parametrize("path", COURSE, ids=lambda p: p.stem)
def test_committed_notebook_metadata_is_what_jupyterlab_writes(path):
    problems = notebooks.metadata_differences(nbformat.read(path, as_version=4))
    assert not problems, f"{problems}; run `python -m bnlab.teaching.notebooks normalize`"


@pytest.mark.parametrize("path", COURSE, ids=lambda p: p.stem)
def test_committed_notebook_outputs_are_clean(path):
    assert notebooks.output_problems(nbformat.read(path, as_version=4)) == []


def test_expected_metadata_comes_from_the_installed_ipykernel():
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    meta = notebooks.expected_metadata()
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert meta["kernelspec"]["display_name"] == spec.display_name
    assert meta["language_info"]["version"] == sys.version.split()[0]
    assert meta["language_info"]["name"] == "python"


def notebook(*outputs, state=None) -> dict:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", execution_count=1, outputs=list(outputs))]
    if state is not None:
        nb.metadata["widgets"] = {notebooks.WIDGET_STATE: {"state": state}}
    return nb


def stream(name: str, text: str) -> dict:
    return nbformat.v4.new_output("stream", name=name, text=text)


def plain(text: str) -> dict:
    return nbformat.v4.new_output("execute_result", {"text/plain": text}, execution_count=1)


@pytest.mark.parametrize(
    "output, why",
    [
        (stream("stderr", "ERROR: gpuGetDeviceCount failed\n"), "stderr output"),
        (nbformat.v4.new_output("error", ename="ValueError", evalue="x", traceback=[]), "error"),
        (plain("{'LeNet': np.float64(0.107)}"), "numpy repr"),
        (stream("stdout", "momentum=0.09999999999999999\n"), "float noise"),
        (plain("0.30000000000000004"), "float noise"),
        (plain("VBox(children=(HBox(children=(FloatLogSlider"), "raw text form"),
    ],
)
def test_each_kind_of_noise_is_caught(output, why):
    problems = notebooks.output_problems(notebook(output))
    assert len(problems) == 1 and why in problems[0], problems


def test_clean_numbers_pass():
    text = "momentum=0.1, eps=1e-05, loss 0.263, 1.0, 0.5000, ratio 1.79x, 100.0 %\n"
    assert notebooks.output_problems(notebook(stream("stdout", text), plain("0.107"))) == []


def tqdm_state(value: int, total: int) -> dict:
    """The saved models of a tqdm notebook bar: HBox(HTML prefix, FloatProgress, HTML suffix)."""
    return {
        "box": {"model_name": "HBoxModel", "state": {"children": [
            "IPY_MODEL_left", "IPY_MODEL_bar", "IPY_MODEL_right"]}},
        "left": {"model_name": "HTMLModel", "state": {"value": "epochs: 100%"}},
        "bar": {"model_name": "FloatProgressModel", "state": {"value": value, "max": total}},
        "right": {"model_name": "HTMLModel", "state": {"value": " 3/3 [00:28&lt;00:00]"}},
    }  # fmt: skip


def test_normalize_stores_the_finished_progress_bar_text():
    view = nbformat.v4.new_output(
        "display_data",
        {notebooks.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "epochs:   0%|  | 0/3"},
    )
    nb = notebooks.normalize(notebook(view, state=tqdm_state(3, 3)))
    assert (
        nb.cells[0].outputs[0]["data"]["text/plain"] == "epochs: 100%|██████████| 3/3 [00:28<00:00]"
    )
    assert nb.metadata["kernelspec"] == notebooks.expected_metadata()["kernelspec"]
    assert notebooks.output_problems(nb) == []


def test_an_unfinished_bar_or_a_view_without_state_is_caught():
    view = nbformat.v4.new_output("display_data", {notebooks.WIDGET_VIEW: {"model_id": "box"}})
    problems = notebooks.output_problems(notebook(view, state=tqdm_state(1, 3)))
    assert "progress bar bar stored at 1/3" in problems
    problems = notebooks.output_problems(notebook(view, state={}))
    assert problems == ["cell 0: widget view without saved state (a blank box)"]


def test_execution_counts_must_run_in_order():
    nb = notebook(plain("1"))
    nb.cells[0]["execution_count"] = 3
    assert "execution counts" in notebooks.output_problems(nb)[0]


def _git_repo(folder, monkeypatch):
    """A git repository in ``folder``; git looks no further up than ``folder``'s parent."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(folder.parent))
    folder.mkdir()
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    return git


@pytest.fixture
def notary(tmp_path, monkeypatch):
    """A fresh signature database, as a learner's first ``make setup`` sees it."""
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    from nbformat.sign import NotebookNotary

    return NotebookNotary()


def scripted(text: str) -> dict:
    """A notebook whose stored output carries HTML with a script: what trust must not sign."""
    html = nbformat.v4.new_output("display_data", {"text/html": f"<script>{text}</script>"})
    return notebook(html)


def test_trust_signs_committed_notebooks_and_leaves_edited_ones(tmp_path, monkeypatch, notary):
    repo = tmp_path / "repo"
    git = _git_repo(repo, monkeypatch)
    paths = [repo / "01_a.ipynb", repo / "02_b.ipynb"]
    for path in paths:
        nbformat.write(notebook(plain("1")), path)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "notebooks"], check=True)
    nbformat.write(notebook(plain("2")), paths[1])  # the learner's edit
    assert notebooks.trust(paths) == [paths[0]]
    assert notary.check_signature(nbformat.read(paths[0], as_version=4))
    assert not notary.check_signature(nbformat.read(paths[1], as_version=4))
    assert notebooks.trust(paths, committed_only=False) == paths
    assert notary.check_signature(nbformat.read(paths[1], as_version=4))


def test_trust_never_signs_an_untracked_notebook(tmp_path, monkeypatch, notary, capsys):
    """A notebook dropped into notebooks/ (from a peer, a download) is not the course's."""
    repo = tmp_path / "repo"
    git = _git_repo(repo, monkeypatch)
    ours, dropped, staged = repo / "01_a.ipynb", repo / "02_x.ipynb", repo / "03_y.ipynb"
    nbformat.write(notebook(plain("1")), ours)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "notebooks"], check=True)
    nbformat.write(scripted("alert(1)"), dropped)
    nbformat.write(scripted("alert(2)"), staged)
    subprocess.run([*git, "add", staged.name], check=True)  # added, never committed
    assert notebooks.trust([ours, dropped, staged]) == [ours]
    for path in (dropped, staged):
        assert not notary.check_signature(nbformat.read(path, as_version=4))
    said = capsys.readouterr().out
    assert "not signing 02_x.ipynb: git does not track it" in said
    assert "not signing 03_y.ipynb" in said and "jupyter trust" in said


@pytest.mark.parametrize("git_found", [True, False], ids=["no-checkout", "no-git-program"])
def test_outside_a_git_checkout_nothing_is_signed(tmp_path, monkeypatch, notary, capsys, git_found):
    """A downloaded archive: bnlab cannot tell the course's notebooks from others."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    if not git_found:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    folder = tmp_path / "download"
    folder.mkdir()
    path = folder / "01_a.ipynb"
    nbformat.write(notebook(plain("1")), path)
    assert notebooks.trust([path]) == []
    assert not notary.check_signature(nbformat.read(path, as_version=4))
    said = capsys.readouterr().out
    assert "not signing 01_a.ipynb" in said and "jupyter trust" in said


def test_a_progress_bar_stored_as_its_first_text_is_caught():
    view = nbformat.v4.new_output(
        "display_data",
        {notebooks.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "epochs:   0%|  | 0/3"},
    )
    problems = notebooks.output_problems(notebook(view, state=tqdm_state(3, 3)))
    assert problems == ["cell 0: progress bar text is not the finished bar"]


def test_a_bar_whose_text_stopped_short_is_caught():
    """tqdm skips redraws within mininterval: a full bar can keep the text "14/15"."""
    state = tqdm_state(15, 15)
    state["right"]["state"]["value"] = " 14/15 [00:01&lt;00:00]"
    view = nbformat.v4.new_output("display_data", {notebooks.WIDGET_VIEW: {"model_id": "box"}})
    nb = notebooks.normalize(notebook(view, state=state))
    assert notebooks.output_problems(nb) == ["cell 0: progress bar text stopped at 14/15"]


def test_a_bar_saved_hidden_is_caught():
    """tqdm hides a bar closed with leave=False: the stored notebook shows a blank line."""
    state = tqdm_state(3, 3)
    state["box"]["state"]["layout"] = "IPY_MODEL_lay"
    state["lay"] = {"model_name": "LayoutModel", "state": {"visibility": "hidden"}}
    view = nbformat.v4.new_output("display_data", {notebooks.WIDGET_VIEW: {"model_id": "box"}})
    nb = notebooks.normalize(notebook(view, state=state))
    assert notebooks.output_problems(nb) == ["progress bar box stored hidden (tqdm leave=False)"]
    notebooks.widget_state(nb)["lay"]["state"]["visibility"] = None
    assert notebooks.output_problems(nb) == []


def test_normalize_drops_saved_widget_models_that_no_output_shows():
    view = nbformat.v4.new_output(
        "display_data",
        {notebooks.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "epochs:   0%|  | 0/3"},
    )
    state = tqdm_state(3, 3)
    shown = set(state)
    state["orphan"] = {"model_name": "FloatProgressModel", "state": {"value": 1, "max": 1}}
    nb = notebooks.normalize(notebook(view, state=state))
    assert set(notebooks.widget_state(nb)) == shown  # the bar and the models it references
    assert notebooks.output_problems(nb) == []


def test_stale_widget_state_that_no_output_shows_is_caught():
    """A kernel saves every widget model it made, e.g. a finished bar whose output was cleared."""
    view = nbformat.v4.new_output(
        "display_data",
        {notebooks.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "epochs:   0%|  | 0/3"},
    )
    nb = notebooks.normalize(notebook(view, state=tqdm_state(3, 3)))
    assert notebooks.output_problems(nb) == []
    notebooks.widget_state(nb)["orphan"] = {
        "model_name": "HTMLModel",
        "state": {"value": "7: 100%"},
    }
    problems = notebooks.output_problems(nb)
    assert len(problems) == 1 and "1 saved widget model(s) that no output shows" in problems[0]
    assert notebooks.output_problems(notebooks.normalize(nb)) == []
