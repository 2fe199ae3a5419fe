"""The tutorial's progress file (issue 25, "Data loss"): only a file the tutorial wrote is ever replaced.
Anything else at the path - a file of notes, a FIFO, a folder, a huge file - is refused with exit 2 and
one `error:` line, and left exactly as it was; a folder that cannot be written gives one warning and a
course that is not saved; no stdin at all counts as the end of input. Driven through run.py, as a user
would (in a subprocess where the case is about the process: stdin closed, a FIFO that would block)."""
import io
import json
import os
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager

import pytest

from conftest import ROOT, load

M = load("02_model")
run = load("run")
from modes import tutorial as T  # noqa: E402

RUN = os.path.join(ROOT, "run.py")


@pytest.fixture(scope="module")
def tiny():
    return M.preset_checkpoint("tiny")


@pytest.fixture
def quick_demos(monkeypatch):
    """Chapters whose demo does nothing: these tests are about the progress file, not the engine."""
    for ch in T.CHAPTERS:
        monkeypatch.setattr(ch, "demo", lambda L: {})


@contextmanager
def deadline(seconds: int):
    """Fail (not hang) if the body blocks, e.g. by opening a FIFO that no one writes."""
    def expired(*_):
        raise TimeoutError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def tutorial(monkeypatch, capsys, stdin, *argv):
    monkeypatch.setattr(sys, "stdin", stdin if not isinstance(stdin, str) else io.StringIO(stdin))
    with deadline(120):
        code = run.main(["--tutorial", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(path) -> tuple:
    st = os.lstat(path)
    content = open(path, "rb").read() if stat.S_ISREG(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_ino, content


def assert_refused(code, out, err, path, why):
    assert code == 2, err
    assert "Traceback" not in err and "Chapter" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in lines[0] and why in lines[0]


# ----------------------------------------------------------------------------- not ours: refused, untouched


def test_a_file_of_notes_is_refused_and_left_untouched(tmp_path):
    """The issue's case, as a user runs it: `--tutorial --progress-file notes.txt` on a file of notes."""
    notes = tmp_path / "notes.txt"
    notes.write_text("call the bank\nbuy milk\n")
    os.chmod(notes, 0o644)
    before = snapshot(notes)
    proc = subprocess.run([sys.executable, RUN, "--tutorial", "--progress-file", "notes.txt"], cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, "notes.txt", T.NOT_OURS)
    assert snapshot(notes) == before                                     # same bytes, mode 644, same inode
    assert os.listdir(tmp_path) == ["notes.txt"]                         # no temporary file either


@pytest.mark.parametrize("content", [b"", b"\n", b"\xff\xfe\x00garbage", b"{not json", b"[1, 2, 3]", b'"text"',
                                     b'{"version": 1, "current": 99}', b'{"version": 2, "current": 3}',
                                     b'{"version": 1, "current": 3, "notes": "mine"}', b'{"name": "my settings"}',
                                     b'{"format": "something else", "version": 1, "current": 3}'])
def test_anything_without_our_marker_is_refused(monkeypatch, capsys, tmp_path, content):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    os.chmod(path, 0o640)
    before = snapshot(path)
    code, out, err = tutorial(monkeypatch, capsys, "1\n", "--progress-file", str(path))
    assert_refused(code, out, err, path, T.NOT_OURS)
    assert "--progress-file" in err and snapshot(path) == before and os.listdir(tmp_path) == ["p.json"]


def test_a_huge_file_is_refused_without_reading_it_all(monkeypatch, capsys, tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(b'{"format": "nano-vllm-py tutorial progress", "pad": "' + b"x" * T.PROGRESS_MAX_BYTES + b'"}')
    before = snapshot(path)
    code, out, err = tutorial(monkeypatch, capsys, "", "--progress-file", str(path))
    assert_refused(code, out, err, path, T.NOT_OURS)
    assert snapshot(path) == before


def test_a_fifo_is_refused_and_never_opened(tmp_path):
    """/dev/null's case without touching /dev/null: a path that is not a regular file. Opening a FIFO
    would block (no writer), so a timeout here means it was opened."""
    fifo = tmp_path / "progress.fifo"
    os.mkfifo(fifo, 0o644)
    before = snapshot(fifo)
    proc = subprocess.run([sys.executable, RUN, "--tutorial", "--progress-file", str(fifo)], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, fifo, "is not a regular file")
    assert snapshot(fifo) == before and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["progress.fifo"]


def test_non_regular_files_are_refused_in_process(monkeypatch, capsys, tmp_path):
    """A symlink to a FIFO, a FIFO at the default location, a folder: refused, nothing opened or written."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to(fifo)
    code, out, err = tutorial(monkeypatch, capsys, "", "--progress-file", str(link))
    assert_refused(code, out, err, link, "is not a regular file")
    assert os.path.islink(link) and stat.S_ISFIFO(os.stat(link).st_mode)

    data = tmp_path / "data"
    (data / "nano-vllm-py").mkdir(parents=True)
    os.mkfifo(data / "nano-vllm-py" / "tutorial.json")
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    code, out, err = tutorial(monkeypatch, capsys, "")
    assert_refused(code, out, err, data / "nano-vllm-py" / "tutorial.json", "is not a regular file")
    assert err.startswith("error: tutorial progress file") and "--progress-file" in err      # says what to do
    assert os.listdir(data / "nano-vllm-py") == ["tutorial.json"]

    folder = tmp_path / "folder.json"
    folder.mkdir()
    code, out, err = tutorial(monkeypatch, capsys, "", "--progress-file", str(folder))
    assert_refused(code, out, err, folder, "is not a regular file")
    assert os.listdir(folder) == []


def test_a_file_that_turns_into_someone_elses_is_not_overwritten(tmp_path):
    """Checked again before every save: a file put at the path while the course runs is left alone."""
    path = tmp_path / "p.json"
    store = T.ProgressStore(str(path))
    assert store.load() == (T.Progress(), False)
    store.save(T.Progress(current=2))
    assert json.loads(path.read_text())["current"] == 2
    store.save(T.Progress(current=3))                                    # our own file: replaced
    assert json.loads(path.read_text())["current"] == 3
    path.unlink()
    path.write_text("my notes\n")                                        # someone else's now
    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        store.save(T.Progress(current=4))
        store.save(T.Progress(current=5))
    finally:
        sys.stderr = old
    assert path.read_text() == "my notes\n" and os.listdir(tmp_path) == ["p.json"]
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and T.NOT_OURS in lines[0]
    assert store.saved_note().startswith("Progress was not saved")


def test_a_file_from_another_version_is_kept_and_not_saved(monkeypatch, capsys, tmp_path, quick_demos):
    path = tmp_path / "p.json"
    text = json.dumps({"format": T.PROGRESS_FORMAT, "version": 99, "lessons": [1, 2, 3]})
    path.write_text(text)
    code, out, err = tutorial(monkeypatch, capsys, "q\n", "--progress-file", str(path), "--chapter", "12")
    assert code == 0 and "Traceback" not in err
    assert err.count("warning:") == 1 and "another version" in err and "Progress was not saved" in out
    assert path.read_text() == text


# ----------------------------------------------------------------------------- a folder that cannot be written


def test_default_location_that_cannot_be_created_warns_once_and_runs(monkeypatch, capsys, tmp_path, quick_demos):
    """Read-only HOME's case (as root permission bits do not stop a write, so the data folder is a path
    under a regular file: it cannot be created). One warning, the course runs, nothing is written."""
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder\n")
    monkeypatch.setenv("XDG_DATA_HOME", str(afile))
    code, out, err = tutorial(monkeypatch, capsys, "n\nq\n", "--chapter", "11")
    assert code == 0 and "Traceback" not in err
    assert err.count("warning:") == 1 and err.startswith("warning: cannot save tutorial progress") and "\n" == err[-1]
    assert len(err.splitlines()) == 1
    assert "Chapter 11/12" in out and "Chapter 12/12" in out and "Progress was not saved" in out
    assert "Progress saved to" not in out
    assert afile.read_text() == "a file, not a folder\n" and os.listdir(tmp_path) == ["afile"]


# ----------------------------------------------------------------------------- no stdin


def test_stdin_closed_is_end_of_input(tmp_path, tiny):
    """`python run.py --tutorial <&-`: sys.stdin is None; that is the end of input, i.e. q, no traceback."""
    path = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, RUN, "--tutorial", "--progress-file", str(path), "--chapter", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Chapter 3/12: Tokenization" in proc.stdout
    assert "Progress saved to" in proc.stdout
    assert json.loads(path.read_text())["current"] == 3


class FailingStdin(io.TextIOBase):
    def readline(self, *_):
        raise OSError(5, "Input/output error")                          # the terminal went away

    def isatty(self):
        raise OSError(5, "Input/output error")


def closed_stdin():
    s = io.StringIO("1\n")
    s.close()
    return s


@pytest.mark.parametrize("stdin", [None, closed_stdin(), FailingStdin(),
                                   io.TextIOWrapper(io.BytesIO(b"\xff\xfe\n"), encoding="utf-8")],
                         ids=["None", "closed", "EIO", "not-utf8"])
def test_no_usable_stdin_quits_cleanly(monkeypatch, capsys, tmp_path, quick_demos, stdin):
    path = tmp_path / "p.json"
    monkeypatch.setattr(sys, "stdin", stdin)
    with deadline(120):
        code = run.main(["--tutorial", "--progress-file", str(path), "--chapter", "5"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err and err == ""
    assert "Chapter 5/12" in out and "Progress saved to" in out
    assert json.loads(path.read_text())["current"] == 5


# ----------------------------------------------------------------------------- our own file: round trip


def test_our_file_round_trips_and_keeps_its_mode(monkeypatch, capsys, tmp_path, quick_demos):
    path = tmp_path / "p.json"
    a5 = [str(q.answer) for q in T.CHAPTERS[4].quiz(T.Qwen3())]
    old_umask = os.umask(0o022)
    try:
        code, out, err = tutorial(monkeypatch, capsys, "\n".join([*a5, "q"]) + "\n", "--progress-file", str(path),
                                  "--chapter", "5")
    finally:
        os.umask(old_umask)
    assert code == 0 and err == ""
    doc = json.loads(path.read_text())
    assert doc["format"] == T.PROGRESS_FORMAT and doc["version"] == T.PROGRESS_VERSION
    assert doc["current"] == 6 and doc["done"] == [5] and doc["scores"] == {"5": {"correct": 3, "total": 3}}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644                  # a new file: 0o644 less the umask

    os.chmod(path, 0o600)                                                # the user's choice is kept
    code, out, err = tutorial(monkeypatch, capsys, "q\n", "--progress-file", str(path))
    assert code == 0 and err == "" and "Resuming at chapter 6 (chapters done: 5)" in out
    assert "Chapter 6/12" in out and "Chapter 5/12" not in out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert T.Progress.from_json(json.loads(path.read_text())) == T.Progress(6, [5], {5: {"correct": 3, "total": 3}})
    assert os.listdir(tmp_path) == ["p.json"]


def test_a_symlink_to_our_file_stays_a_symlink(monkeypatch, capsys, tmp_path, quick_demos):
    real = tmp_path / "real.json"
    T.ProgressStore(str(real)).save(T.Progress(current=7))
    link = tmp_path / "link.json"
    link.symlink_to(real)
    code, out, err = tutorial(monkeypatch, capsys, "n\nq\n", "--progress-file", str(link))
    assert code == 0 and err == "" and "Resuming at chapter 7" in out
    assert os.path.islink(link) and json.loads(real.read_text())["current"] == 8
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


def test_a_file_from_before_the_marker_is_still_ours(monkeypatch, capsys, tmp_path, quick_demos):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 1, "current": 4, "done": [1, 2, 3], "scores": {}, "finished": False}))
    code, out, err = tutorial(monkeypatch, capsys, "q\n", "--progress-file", str(path))
    assert code == 0 and err == "" and "Resuming at chapter 4 (chapters done: 1, 2, 3)" in out
    doc = json.loads(path.read_text())
    assert doc["format"] == T.PROGRESS_FORMAT and doc["current"] == 4 and doc["done"] == [1, 2, 3]
