"""``lamina serve``'s log: one ``lamina serve:`` line a record, whatever it quotes."""

from __future__ import annotations

import io
import logging

from lamina.cli.serve import LogLines


def test_a_quoted_line_break_or_escape_cannot_forge_a_log_line() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(LogLines("lamina serve: %(message)s"))
    log = logging.getLogger("lamina.test.serve-log")
    log.addHandler(handler)
    log.propagate = False
    try:
        key = "k\nlamina serve: stopping (grace 0.0s)\r\x1b]0;owned\x07\x1b[2J"
        log.warning("RPC failed: NotFound: snapshot %s", key)
        try:
            raise ValueError(f"bad key {key}")
        except ValueError:
            log.exception("internal error in RPC")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    starts = [ln for ln in lines if ln.startswith("lamina serve:")]
    assert starts == ["lamina serve: RPC failed: NotFound: snapshot k",
                      "lamina serve: internal error in RPC"], lines
    assert all(ln.startswith("    ") for ln in lines if not ln.startswith("lamina serve:"))
    assert "    lamina serve: stopping (grace 0.0s)\\r\\x1b]0;owned\\x07\\x1b[2J" in lines
    assert "Traceback (most recent call last):" in out.getvalue()
    assert not any(c in out.getvalue() for c in "\r\x1b\x07")
