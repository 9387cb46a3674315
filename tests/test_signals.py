"""lamina.util.signals: SIGTERM and SIGHUP as an exception, held over a cleanup."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from lamina.util.signals import Terminated, as_exception, deferred


def _wait_for_signal() -> None:
    time.sleep(0.2)  # the handler runs between bytecodes of the main thread


def test_a_signal_in_a_deferred_block_is_raised_after_it() -> None:
    done: list[str] = []
    with as_exception():
        with pytest.raises(Terminated) as caught, deferred():
            with deferred():  # nested: held to the outermost end
                os.kill(os.getpid(), signal.SIGTERM)
                _wait_for_signal()
                done.append("inner")
            done.append("outer")
        assert caught.value.signum == signal.SIGTERM and str(caught.value) == "SIGTERM"
        assert done == ["inner", "outer"]
        with pytest.raises(Terminated):  # outside a deferred block: at once
            os.kill(os.getpid(), signal.SIGHUP)
            _wait_for_signal()
            done.append("not reached")
    assert done == ["inner", "outer"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_a_deferred_block_that_fails_raises_its_own_error() -> None:
    with as_exception():
        with pytest.raises(ValueError), deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for_signal()
            raise ValueError("the block's own")
        with deferred():  # the signal went with the failure, not held for later
            pass


def test_an_ignored_signal_stays_ignored_and_threads_change_nothing() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with as_exception():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            seen: list[object] = []

            def elsewhere() -> None:
                with as_exception(), deferred():
                    seen.append(signal.getsignal(signal.SIGTERM))

            t = threading.Thread(target=elsewhere)
            t.start()
            t.join()
            assert seen == [signal.getsignal(signal.SIGTERM)]
    finally:
        signal.signal(signal.SIGHUP, previous)
