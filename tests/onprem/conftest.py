"""The session's throwaway host fixture (``onprem``) lives in session.py and is registered once,
in tests/conftest.py, so tests/onprem and tests/conformance share ONE host per test run. Do not
define or import the fixture here: a second registration would boot a second host."""

from __future__ import annotations

from .session import Onprem

__all__ = ["Onprem"]
