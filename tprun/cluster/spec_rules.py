"""The rules a job spec's strings must follow before they reach an sbatch script, a manifest or a command line.

A job spec is untrusted text. A newline in `slurm.partition` would end the `#SBATCH` line and make the
rest a shell command of the batch script (shlex.quote does not stop newlines); one in a Kubernetes
field makes an object the API server refuses, or a different one. So every such string is refused at
the pydantic edge (tprun/config.py) with the field named, and render and submit re-run that validation.
The Kubernetes rules are the API server's own (k8s.io/apimachinery/pkg/util/validation), named in the
error so a user can look them up.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
# One long option, `--name` or `--name=value`; the value has no whitespace, so the item cannot carry a
# second option, and sbatch's and srun's parsers see exactly one. (Short options are not accepted:
# submitit writes every sbatch option as `--name=value`.)
OPTION = re.compile(r"^--(?P<name>[A-Za-z][A-Za-z0-9-]*)(=(?P<value>\S+))?$")
# Unicode's line and paragraph separators: YAML and many terminals treat them as line breaks.
_BREAKS = {"Cc", "Zl", "Zp"}


def control_character(text: str) -> str | None:
    """The first control character in `text` (C0, DEL, C1, or a Unicode line break), or None."""
    return next((c for c in text if unicodedata.category(c) in _BREAKS), None)


def no_control(text: str) -> str:
    bad = control_character(text)
    if bad is not None:
        raise ValueError(
            f"{text!r} contains the control character {bad!r} (U+{ord(bad):04X}); control characters "
            "(newline, carriage return, NUL, tab, ...) are refused because they would end a line of the "
            "sbatch script or manifest and start another"
        )
    return text


def option(text: str) -> str:
    no_control(text)
    if not OPTION.fullmatch(text):
        raise ValueError(
            f"{text!r} is not one option: write each as its own item '--name' or '--name=value' (no spaces; "
            "e.g. '--exclusive', '--mail-type=END,FAIL')"
        )
    return text


def split_option(text: str) -> tuple[str, str | None]:
    """('name', 'value' | None) of an item that passed `option`."""
    m = OPTION.fullmatch(option(text))
    return m["name"], m["value"]


def _within(text: str, pattern: re.Pattern[str], limit: int, rule: str) -> str:
    """The length-and-pattern shape of the API server's name rules; ValueError saying `text` must be `rule`."""
    if len(text) > limit or not pattern.fullmatch(text):
        raise ValueError(f"{text!r} must be {rule}")
    return text


def dns1123_label(text: str) -> str:
    return _within(text, DNS1123_LABEL, 63, "a DNS-1123 label: at most 63 lower-case letters, digits and '-', "
                   "starting and ending with a letter or digit")


def dns1123_subdomain(text: str) -> str:
    return _within(text, DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain: at most 253 characters, dot-separated "
                   "DNS-1123 labels (lower-case letters, digits and '-')")


def label_value(text: str) -> str:
    return _within(text, LABEL_VALUE, 63, "a Kubernetes label value: at most 63 letters, digits, '-', '_' "
                   "and '.', starting and ending with a letter or digit (or empty)")


def qualified_name(text: str) -> str:
    """A label key or extended resource name: [DNS-1123 subdomain '/'] name (<= 63 characters)."""
    prefix, _, name = text.rpartition("/")
    if prefix:
        try:
            dns1123_subdomain(prefix)
        except ValueError:
            raise ValueError(f"{text!r} must be a Kubernetes qualified name: its prefix {prefix!r} must be "
                             "a DNS-1123 subdomain (e.g. 'example.com/gpu')") from None
    if len(name) > 63 or not LABEL_NAME.fullmatch(name):
        raise ValueError(f"{text!r} must be a Kubernetes qualified name: [prefix/]name with the name at most "
                         "63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit")
    return text


def no_control_anywhere(value: Any, where: str = "") -> Any:
    """Every string (keys too) inside nested dicts and lists is free of control characters."""
    if isinstance(value, str):
        try:
            no_control(value)
        except ValueError as e:
            raise ValueError(f"{where or 'value'}: {e}") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            no_control_anywhere(k, f"{where}[{k!r}]")
            no_control_anywhere(v, f"{where}[{k!r}]")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            no_control_anywhere(v, f"{where}[{i}]")
    return value


Text = Annotated[str, AfterValidator(no_control)]
Option = Annotated[str, AfterValidator(option)]
DNSLabel = Annotated[str, AfterValidator(dns1123_label)]
DNSSubdomain = Annotated[str, AfterValidator(dns1123_subdomain)]
LabelValue = Annotated[str, AfterValidator(label_value)]
QualifiedName = Annotated[str, AfterValidator(qualified_name)]
