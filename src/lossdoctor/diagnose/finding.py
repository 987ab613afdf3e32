"""The one finding type: made by a check, completed by its rule, framed by the run's profile,
grouped, and written to the report.

A check fills in what it found and where (``message``, ``head``, ``level``, ``profile``,
``image``, ``term``, ``evidence``, ``cause``) and may ask for its rule's lesser severity
(``minor``), its own fix (``fix``) or a sharper first step (``fix_prefix``). Its rule then sets
``code``, ``severity`` and the final ``fix`` (:func:`findings.to_finding`); framing sets ``scope``
and ``note`` (:func:`groups.frame`); a multi-rank step sets ``rank``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..vocab import GradTerm, Head, Scope, Severity, Term


@dataclass(kw_only=True)
class Finding:
    message: str
    head: Head | None = None
    level: str | None = None
    profile: str | None = None
    image: int | None = None
    term: Term | GradTerm | None = None
    evidence: dict = field(default_factory=dict)
    # what the finding has in common with the others of its cause, without where it is (its
    # level, term, profile, image): findings of one code and cause make one grouped finding
    cause: str | None = None
    # set by the rule
    code: str = ""
    severity: Severity = Severity.INFO
    fix: str = ""  # a check's own fix replaces its rule's
    # a check's requests to its rule (not reported)
    minor: bool = field(default=False, metadata={"internal": True})
    fix_prefix: str = field(default="", metadata={"internal": True})
    # set once the run's own profile is known (groups.frame)
    scope: Scope | None = None
    note: str = ""  # said after the message: what switching profile would do to it
    rank: int | None = None  # the rank whose dump it was found in, in a multi-rank step
