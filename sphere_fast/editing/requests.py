"""One edit request type for every dataset (CounterFact, ZsRE) and every method."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``prompt.format(subject)`` to continue with ``target_new``.

    ``prompt`` holds one ``{}`` where the subject goes. ``target_new`` and
    ``target_true`` are the bare strings; methods and metrics tokenise them with
    a leading space. ``neighborhood_targets[i]`` is the expected continuation
    of ``neighborhood_prompts[i]`` (unchanged knowledge).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_prompts: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_targets: tuple[str, ...] = field(default_factory=tuple)
    case_id: int | str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def validate(self) -> None:
        """Raise ValueError naming the field when the request cannot be edited."""
        where = f"request {self.case_id!r}" if self.case_id is not None else "request"
        if self.prompt.count("{}") != 1:
            raise ValueError(f"{where}: prompt must contain exactly one '{{}}' for the subject, got {self.prompt!r}")
        if not self.subject.strip():
            raise ValueError(f"{where}: subject is empty")
        if not self.target_new.strip():
            raise ValueError(f"{where}: target_new is empty")
        if len(self.neighborhood_prompts) != len(self.neighborhood_targets) and self.neighborhood_targets:
            raise ValueError(
                f"{where}: {len(self.neighborhood_prompts)} neighborhood_prompts but "
                f"{len(self.neighborhood_targets)} neighborhood_targets"
            )
