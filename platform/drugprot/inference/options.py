"""How a model is run: one typed, self-checking set of options read by ``drugprot predict``, ``drugprot serve``,
the Serve YAML, the bulk job and its Ray actors. Imports neither torch nor Ray.

Every rule about these options lives in the validators below, once. A rule's message names the options it is about
in a placeholder (``{precision}``), rendered for whoever reads it: a flag (``--precision``) for the command line, a
key (``precision:``) for a config, a keyword (``precision``) for Python callers (:func:`option_errors`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

PRECISIONS = ("bf16", "fp32", "cascade")
EXECUTIONS = ("auto", "loop", "fold")
#: cascade: pairs whose bf16 top-2 probability margin is below this are re-scored in fp32. On the development set bf16
#: moved a probability by at most 0.0033 (MiniLM demo champion) and 0.0078 (a better-trained MiniLM), and 0.01 kept
#: every label of both (bench/cpu_predict.py measures it for any model).
CASCADE_MARGIN = 0.01


class InferenceOptions(BaseModel):
    """Everything that changes how a model is run; ``None`` keeps what the model folder records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vote: Literal["hard", "soft"] | None = Field(None, description="How members vote: hard (majority of top labels) or "
                                                 "soft (mean probability); default: the ensemble's recorded vote.")
    interval: tuple[int, int] | None = Field(None, description="GENE interval LO HI around each chemical; default: the "
                                             "model's.")
    precision: str = Field("bf16", description="bf16: autocast on CUDA (fast on GPUs; a CPU computes fp32); fp32; CPU "
                           "only: cascade (a bf16 weight copy scores every pair, pairs with a close top-2 margin are "
                           "re-scored in fp32: the fast CPU path).")
    cascade_margin: float | None = Field(None, description="precision cascade: pairs whose bf16 top-2 probability "
                                         f"margin is below this are re-scored in fp32 (default {CASCADE_MARGIN}; 0: "
                                         "bf16 alone, the fastest).")
    execution: str = Field("auto", description="auto: members stacked into one forward on an accelerator (fold), in "
                           "turn on CPU, where skipping settled pairs pays more; loop or fold force one.")
    early_exit: float | Literal["calibrated"] | None = Field(None, description="An ensemble's members, run in turn, "
                                                             "stop on a pair once all so far vote no relation with "
                                                             "mean P(NONE) at least this; 'calibrated': the "
                                                             "confidence the ensemble folder records (default: none, "
                                                             "the exact vote).")

    @field_validator("precision", "execution", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: ValidationInfo) -> str:
        choices = PRECISIONS if info.field_name == "precision" else EXECUTIONS
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    @field_validator("cascade_margin", mode="before")
    @classmethod
    def _margin(cls, value: Any) -> Any:
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0.0 <= value <= 1.0):
            raise ValueError("must be between 0 and 1 (a probability margin)")
        return value

    @field_validator("early_exit", mode="before")
    @classmethod
    def _exit(cls, value: Any) -> Any:
        if value is None or value == "calibrated":
            return value
        try:
            confidence = float("nan") if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            confidence = float("nan")
        if not 0.0 < confidence <= 1.0:
            raise ValueError("must be a probability in (0, 1] or 'calibrated'")
        return confidence

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        if value is not None:
            value = tuple(value)
            if len(value) == 2 and all(isinstance(v, int) for v in value) and value[0] > value[1]:
                raise ValueError("LO must not exceed HI")
        return value

    @model_validator(mode="after")
    def _together(self) -> InferenceOptions:
        stacked = self.execution == "fold"
        if self.cascade_margin is not None and self.precision != "cascade":
            raise ValueError(f"{{cascade_margin}} applies to {{precision}} cascade only, got {{precision}} {self.precision}")
        if stacked and self.precision == "cascade":
            raise ValueError(f"{{execution}} {self.execution!r} cannot stack {self.precision} members; use 'auto' or 'loop'")
        if stacked and self.early_exit is not None:
            raise ValueError(f"{{execution}} {self.execution!r} cannot exit early; members leave pairs early only in turn")
        return self

    @property
    def margin(self) -> float:
        """The cascade's margin, its default filled in."""
        return CASCADE_MARGIN if self.cascade_margin is None else self.cascade_margin

    def device_problem(self, device: str) -> str | None:
        """Why these options cannot run on ``device`` (``cpu``, ``cuda``…), or None."""
        if self.precision == "cascade" and not str(device).startswith("cpu"):
            return f"precision {self.precision!r} runs on CPU only, not {device}"
        return None


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def render(message: str, style: Literal["flag", "key", "keyword"]) -> str:
    """A rule's message with its option names as the reader spells them; the leading name is the subject (a key
    then takes a colon)."""
    def name(match: re.Match) -> str:
        field = match.group(1)
        if style == "flag":
            return "--" + field.replace("_", "-")
        return field + (":" if style == "key" and match.start() == 0 else "")

    return _PLACEHOLDER.sub(name, message)


def option_errors(error: ValidationError, style: Literal["flag", "key", "keyword"]) -> list[str]:
    """One line per problem: the option (as ``style`` spells it), what was wrong, and the value found."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:
            lines.append(render(message, style))
            continue
        name = ".".join(str(part) for part in problem["loc"])
        subject = {"flag": "--" + name.replace("_", "-"), "key": name + ":", "keyword": name}[style]
        found = f", got {problem['input']!r}" if problem.get("type") != "missing" and "input" in problem else ""
        lines.append(f"{subject} {message}{found}")
    return lines


def inference_options(style: Literal["flag", "key", "keyword"] = "keyword", **values: Any) -> InferenceOptions:
    """Validated options; a ValueError whose lines name each problem in ``style``."""
    try:
        return InferenceOptions(**values)
    except ValidationError as error:
        raise ValueError("\n".join(option_errors(error, style))) from None


def add_inference_arguments(parser) -> None:
    """The flags of :class:`InferenceOptions`, for ``drugprot predict`` and ``drugprot serve`` alike (every default
    None: the options' own defaults apply, and a config sees only what was given)."""
    fields = InferenceOptions.model_fields
    parser.add_argument("--vote", choices=("hard", "soft"), help=fields["vote"].description)
    parser.add_argument("--interval", nargs=2, type=int, metavar=("LO", "HI"), help=fields["interval"].description)
    parser.add_argument("--precision", choices=PRECISIONS, help=f"{fields['precision'].description} Default bf16.")
    parser.add_argument("--cascade-margin", type=float, help=fields["cascade_margin"].description)
    parser.add_argument("--execution", choices=EXECUTIONS, help=fields["execution"].description)
    parser.add_argument("--early-exit", nargs="?", const="calibrated", metavar="P",
                        help=fields["early_exit"].description.replace("%", "%%"))


def given_arguments(args) -> dict[str, Any]:
    """The inference flags given on the command line, as option keys."""
    values = {name: getattr(args, name, None) for name in InferenceOptions.model_fields}
    return {key: value for key, value in values.items() if value is not None}
