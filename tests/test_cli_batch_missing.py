"""Without Apache Beam (the serving install), ``dermal-fn batch`` says what to install, in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dermal_fn.tools.cli import main


@pytest.mark.skipif(
    importlib.util.find_spec("apache_beam") is not None, reason="Apache Beam is installed here"
)
def test_batch_without_beam_says_what_to_install(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    argv = ["batch", "--model", "m.dermal", "--input", str(tmp_path), "--output", str(tmp_path / "rows")]
    assert main(argv) == 2
    assert "pip install 'dermal-fn[batch]'" in caplog.text and "Traceback" not in caplog.text


def test_only_batch_takes_options_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["predict", "m.dermal", "photo.jpg", "--runner", "DataflowRunner"])
    assert (
        exited.value.code == 2
        and "unrecognized arguments: --runner DataflowRunner" in capsys.readouterr().err
    )
