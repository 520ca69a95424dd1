"""A seeded corpus of bad inputs: every one must be refused with exit 2 and one `error:` line.

Issue 11's probe found that a fifth of about 350 generated bad inputs gave tracebacks, hangs or a
"succeeded" job. This is that probe kept: `corpus()` builds the same classes, deterministically
(SEED), and tests/test_bad_inputs.py runs them against `spotune plan`, `spotune launch` (local
backend) and `python -m recipes.sft`.

Each `Case` carries the files it needs (bytes, or a special file: FIFO, directory, socket, symlink
loop), the spec it points each command at, extra arguments per command (None: the case does not
apply to that command) and `expect`, a regular expression the one error line must match, so a case
passes only when it is refused for its own reason, never because the harness broke something else.

    python tests/bad_inputs.py          # how many cases of each kind
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import re
from dataclasses import dataclass
from typing import Optional, Union

SEED = 11
SECRET = "hunter2-not-for-logs"   # a password some cases carry: no error line may repeat it

FIFO, DIRECTORY, SOCKET, SYMLINK_LOOP, DANGLING_LINK = "<fifo>", "<directory>", "<socket>", "<symlink-loop>", "<dangling-link>"
SPECIAL_FILES = (FIFO, DIRECTORY, SOCKET, SYMLINK_LOOP, DANGLING_LINK)
Content = Union[bytes, str]      # bytes, or one of SPECIAL_FILES

# A job small enough that a wrongly accepted case would end in seconds (max_steps: 1), with its
# data beside it. Values are raw YAML text, so a case can put `.inf` or `"a\nb"` in verbatim.
BASE_SPEC = {
    "name": "bad-input-probe", "model": "tiny-llama", "method": "lora",
    "lora": {"r": "4", "alpha": "8", "dropout": "0.0"},
    "data": {"path": "data.jsonl", "format": "alpaca"},
    "seq_len": "256", "epochs": "1",
    "batch": {"micro": "2", "global": "2"},
    "checkpoint": {"every_steps": "1", "keep": "1"},
    "train": {"lr": "1.0e-3", "seed": "42", "max_steps": "1"},
    "local": {"price_per_hour": "0.5"},
}
GOOD_DATA = "".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n"
                    for w in ("one", "two", "three", "four", "five", "six", "seven", "eight"))

# One value for every number in the spec, written as YAML scalars. Every field has a finite range
# (contract/spec.py), so each of these is out of it or not a finite number at all.
NUMBER_FIELDS = (
    "lora.r", "lora.alpha", "lora.dropout", "data.examples", "data.tokens_per_example", "data.validation_fraction",
    "seq_len", "epochs", "batch.micro", "batch.global", "checkpoint.every_minutes", "checkpoint.every_steps",
    "checkpoint.keep", "train.lr", "train.warmup_ratio", "train.weight_decay", "train.seed", "train.max_grad_norm",
    "train.max_steps", "train.log_every_steps", "constraints.max_price_per_hour", "constraints.budget",
    "constraints.deadline_hours", "constraints.max_gpus", "local.price_per_hour", "sky.max_restarts_on_errors",
    "sky.max_options",
)
BAD_NUMBERS = (".inf", "-.inf", ".nan", "1e400", "1.0e+30", str(2**70), "-1", "1e308")


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    expect: str                                   # regex the error line must match
    files: tuple[tuple[str, Content], ...] = ()   # written into the case's directory; spec.yaml and data.jsonl by default
    spec: str = "{dir}/spec.yaml"                 # what each command is pointed at ({dir}: the case's directory)
    plan: Optional[tuple[str, ...]] = ()          # extra `plan` arguments; None: not a `plan` case
    launch: Optional[tuple[str, ...]] = ()        # extra `launch` arguments; None: not a `launch` case
    recipe: Optional[tuple[str, ...]] = ()        # extra `python -m recipes.sft` arguments; None: not a recipe case
    before: tuple[str, ...] = ()                  # global options, before the command
    command: Optional[tuple[str, ...]] = None     # a whole other command line instead (status, cancel, catalog...)
    hazard: bool = False                          # would hang or eat memory without its guard: run in a subprocess

    def file_map(self) -> dict[str, Content]:
        found = dict(self.files)
        found.setdefault("data.jsonl", GOOD_DATA.encode())
        found.setdefault("spec.yaml", spec_text().encode())
        return found


def spec_text(data: str = "data.jsonl", **overrides: str) -> str:
    """The base spec as YAML, with `data.path` = `data` and `section.field=<raw YAML>` overrides."""
    tree = {key: dict(value) if isinstance(value, dict) else value for key, value in BASE_SPEC.items()}
    tree["data"]["path"] = data
    for dotted, raw in overrides.items():
        section, _, field = dotted.rpartition(".")
        (tree.setdefault(section, {}) if section else tree)[field] = raw
    lines = []
    for key, value in tree.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


def _spec_case(id: str, kind: str, expect: str, spec: Union[str, bytes], **kw) -> Case:
    data = spec if isinstance(spec, bytes) else spec.encode()
    files = (("spec.yaml", data),) + tuple(kw.pop("files", ()))
    return Case(id, kind, expect, files=files, **kw)


# ---- the classes of the issue ----------------------------------------------------------------

def encodings(rng: random.Random) -> list[Case]:
    """Specs that are not UTF-8: random bytes, latin-1, UTF-16/32, compressed, broken sequences."""
    good = spec_text().encode()
    cases = []
    for i in range(16):
        while True:
            blob = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 7, 64, 512, 4096))))
            try:
                blob.decode("utf-8")
            except UnicodeDecodeError:
                break
        cases.append(_spec_case(f"random-bytes-{i:02d}", "encoding", r"not UTF-8 text", blob))
    for i, (where, word) in enumerate((("name", "café"), ("model", "tïny-llama"), ("data.path", "données.jsonl"),
                                       ("comment", "naïve"), ("lora.target_modules", "[q_pröj]"), ("comment", "ÿ"))):
        text = spec_text() + f"# {word}\n" if where == "comment" else spec_text(**{where: word})
        cases.append(_spec_case(f"latin-1-{i}", "encoding", r"not UTF-8 text", text.encode("latin-1")))
    for codec in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
        cases.append(_spec_case(codec, "encoding", r"not UTF-8 text: .*(UTF-16|UTF-32|NUL)", spec_text().encode(codec)))
    for name, packed in (("gzip-1", gzip.compress(good, 1)), ("gzip-9", gzip.compress(good, 9)),
                         ("bzip2", bz2.compress(good)), ("xz", lzma.compress(good))):
        cases.append(_spec_case(name, "encoding", r"not UTF-8 text: it is (gzip-compressed|a compressed archive)", packed))
    broken = {"truncated-multibyte": b"\xc3", "overlong-nul": b"\xc0\x80", "encoded-surrogate": b"\xed\xa0\x80",
              "byte-ff": b"\xff", "lone-continuation": b"\x80", "five-byte-form": b"\xf8\x88\x80\x80\x80"}
    for name, bad in broken.items():
        cases.append(_spec_case(name, "encoding", r"not UTF-8 text \(.* at line 2", good.replace(b"model:", bad + b"\nmodel:", 1)))
    cases.append(_spec_case("nul-bytes", "encoding", r"NUL bytes", good + b"\0\0\0"))
    return cases


def numbers() -> list[Case]:
    """Every number in the spec, at every non-finite or out-of-range value; and the issue's three."""
    cases = []
    for field in NUMBER_FIELDS:
        for value in BAD_NUMBERS:
            cases.append(_spec_case(f"{field}={value}", "number", rf"field '{re.escape(field)}'", spec_text(**{field: value})))
    cases += [
        _spec_case("seq_len-past-context", "number", r"field 'seq_len': 1048576 is longer than model 'tiny-llama'",
                   spec_text(seq_len="1048576")),
        _spec_case("seq_len-2048-past-tiny-context", "number", r"max_position_embeddings 1024", spec_text(seq_len="2048")),
        _spec_case("token-total-overflow", "number", r"data.examples x data.tokens_per_example x epochs",
                   spec_text(**{"data.examples": "10000000000", "data.tokens_per_example": "1000000", "epochs": "100"})),
        _spec_case("lora.r-float", "number", r"field 'lora.r'", spec_text(**{"lora.r": "4.5"})),
        _spec_case("batch.micro-true", "number", r"field 'batch.micro'", spec_text(**{"batch.micro": "true"})),
    ]
    return cases


def names_and_paths() -> list[Case]:
    """Names and paths too long for the kernel or the ledger, or with control characters in them."""
    long_name = "x" * 300
    raw = {
        "name-64": ("name", "x" * 64, r"field 'name'"),
        "name-100k": ("name", "x" * 100_000, r"field 'name'"),
        "name-newline": ("name", '"a\\nb"', r"field 'name'"),
        "name-escape": ("name", '"probe\\e[2J"', r"field 'name'"),
        "model-5000": ("model", "m" * 5000, r"field 'model': is not a usable path: it is 5,000 bytes"),
        "model-long-component": ("model", f"org/{long_name}", r"field 'model': is not a usable path: one of its names"),
        "model-newline": ("model", '"tiny\\nllama"', r"field 'model': must not contain control characters"),
        "model-escape": ("model", '"tiny\\e[31mllama"', r"field 'model': must not contain control characters"),
        "model-nul": ("model", '"tiny\\0llama"', r"field 'model'"),
        "model-empty": ("model", '""', r"field 'model'"),
        "data-path-5000": ("data.path", "d/" * 2500, r"field 'data.path': is not a usable path"),
        "data-path-long-component": ("data.path", long_name + ".jsonl", r"field 'data.path': is not a usable path: one of its names"),
        "data-path-newline": ("data.path", '"data\\n.jsonl"', r"field 'data.path': must not contain control characters"),
        "data-path-nul": ("data.path", '"data\\0.jsonl"', r"field 'data.path'"),
        "local-gpu-65": ("local.gpu", "G" * 65, r"field 'local.gpu'"),
        "local-gpu-tab": ("local.gpu", '"H100\\t"', r"field 'local.gpu'"),
        "region-1000": ("constraints.regions", f"[{'r' * 1000}]", r"field 'constraints.regions.0'"),
        "gpu-newline": ("constraints.gpus", '["H100\\nA100"]', r"field 'constraints.gpus.0'"),
        "target-module-newline": ("lora.target_modules", '["q_proj\\n"]', r"field 'lora.target_modules.0'"),
        "secret-escape": ("sky.secrets", '["HF_\\eTOKEN"]', r"field 'sky.secrets.0'"),
        "bucket-5000": ("sky.bucket", "b" * 5000, r"field 'sky.bucket'"),
    }
    cases = [_spec_case(id, "name", expect, spec_text(**{field: value})) for id, (field, value, expect) in raw.items()]
    # The spec path itself, on the command line: the kernel would refuse it with ENAMETOOLONG.
    cases += [
        Case("spec-path-long-component", "name", r"spec file path .* is not usable: one of its names", spec="{dir}/" + long_name + ".yaml"),
        Case("spec-path-5000", "name", r"spec file path .* is not usable: it is", spec="{dir}/" + "s/" * 2500 + "spec.yaml"),
        Case("spec-path-newline", "name", r"spec file not found: .*\\n", spec="{dir}/spec\n.yaml"),
    ]
    return cases


def special_files() -> list[Case]:
    """What is not a regular file, as the spec and as the data: devices, /proc, FIFOs, sockets, links."""
    expect_kind = {"/dev/zero": "a character device", "/dev/urandom": "a character device", "/dev/null": "a character device",
                   FIFO: r"a FIFO \(named pipe\)", DIRECTORY: "a directory", SOCKET: "a socket"}
    cases = []
    for target in ("/dev/zero", "/dev/urandom", "/dev/null", "/proc/self/mem", FIFO, DIRECTORY, SOCKET, SYMLINK_LOOP,
                   DANGLING_LINK, "/proc/self/status", "/proc/self/environ"):
        label = target.strip("<>").replace("/", "-").strip("-")
        if target in SPECIAL_FILES:
            files, path = (("special", target),), "{dir}/special"
        else:
            files, path = (), target
        spec_expect = {"/proc/self/mem": r"cannot read spec file /proc/self/mem: Input/output error",
                       SYMLINK_LOOP: r"cannot open spec file .*: Too many levels of symbolic links",
                       DANGLING_LINK: r"spec file not found",
                       "/proc/self/status": r"(unknown|missing) field",        # a regular file of YAML-like text
                       "/proc/self/environ": r"NUL bytes"}.get(target, rf"spec file .* is {expect_kind.get(target)}, not a regular file")
        data_expect = {"/proc/self/mem": r"cannot read data file /proc/self/mem: Input/output error",
                       # the planner asks whether the file exists first: a link loop or a dangling link does not
                       SYMLINK_LOOP: r"(cannot open data file .*: Too many levels of symbolic links|data(set)? file not found)",
                       DANGLING_LINK: r"data(set)? file not found",
                       "/proc/self/status": r"not valid JSON",
                       "/proc/self/environ": r"not valid (JSON|UTF-8)"}.get(target, rf"data file .* is {expect_kind.get(target)}, not a regular file")
        cases.append(Case(f"spec-{label}", "special-file", spec_expect, files=files, spec=path, hazard=True))
        data_path = path.replace("{dir}/", "")
        cases.append(_spec_case(f"data-{label}", "special-file", data_expect, spec_text(data=data_path),
                                files=files, hazard=True))
    cases.append(Case("spec-missing", "special-file", r"spec file not found", spec="{dir}/nope.yaml"))
    cases.append(_spec_case("data-missing", "special-file", r"data(set)? file not found", spec_text(data="nope.jsonl")))
    return cases


def data_contents(rng: random.Random) -> list[Case]:
    """Data files a JSON parser or a line reader could choke on."""
    def data_case(id: str, expect: str, data: bytes, hazard: bool = False) -> Case:
        return Case(f"data-{id}", "data", expect, files=(("data.jsonl", data),), hazard=hazard)

    good = GOOD_DATA.encode()
    cases = [
        data_case("nested-list-100k", r"not valid JSON \(nested deeper than 100 levels", b"[" * 100_000 + b"]" * 100_000 + b"\n", True),
        data_case("nested-object-100k", r"nested deeper than 100 levels", b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n", True),
        data_case("nested-unclosed-100k", r"nested deeper than 100 levels", b"[" * 100_000 + b"\n", True),
        data_case("nested-101", r"nested deeper than 100 levels", b"[" * 101 + b"]" * 101 + b"\n"),
        data_case("nested-in-record", r"nested deeper than 100 levels",
                  b'{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b', "output": "x"}\n'),
        data_case("line-random-bytes", r"not valid UTF-8", good + bytes([0xff, 0xfe, 0x80]) + b"\n"),
        data_case("utf-16", r"not valid (UTF-8|JSON)", GOOD_DATA.encode("utf-16")),
        data_case("gzip", r"not valid UTF-8", gzip.compress(good)),
        data_case("a-json-array-line", r"data\.jsonl:1:", b"[1, 2, 3]\n"),
        data_case("a-scalar-line", r"data\.jsonl:1:", b"42\n"),
        data_case("truncated-json", r"not valid JSON", b'{"instruction": "x", "output": \n'),
        data_case("empty-file", r"no training examples", b""),
        data_case("blank-lines", r"no training examples", b"\n\n   \n"),
        data_case("wrong-keys", r"data\.jsonl:1:", b'{"question": "q", "answer": "a"}\n'),
    ]
    for i in range(4):
        line = bytes(rng.randrange(256) for _ in range(rng.choice((3, 40, 300))))
        cases.append(data_case(f"random-line-{i}", r"data\.jsonl:\d+: not valid (UTF-8|JSON)", line.replace(b"\n", b"") + b"\n"))
    return cases


def structure() -> list[Case]:
    """Specs whose shape is the attack: huge lists, deep nesting, alias bombs, size, wrong top level."""
    hundred_k = "[" + ", ".join(f"g{i}" for i in range(100_000)) + "]"
    cases = [_spec_case(f"{field.replace('.', '-')}-100k", "structure", rf"field '{re.escape(field)}': List should have at most 256 items",
                        spec_text(**{field: hundred_k}))
             for field in ("constraints.gpus", "constraints.providers", "constraints.regions", "sky.secrets")]
    cases += [
        _spec_case("target-modules-100k", "structure", r"field 'lora.target_modules'",
                   spec_text(**{"lora.target_modules": "[" + ", ".join(f"m{i}" for i in range(100_000)) + "]"})),
        _spec_case("flow-nesting-100k", "structure", r"malformed YAML .*nesting depth|nested too deeply",
                   spec_text(**{"sky.secrets": "[" * 100_000 + "]" * 100_000}), hazard=True),
        _spec_case("mapping-nesting-100k", "structure", r"malformed YAML .*nesting depth|nested too deeply",
                   spec_text(**{"sky.bucket": "{a: " * 100_000 + "1" + "}" * 100_000}), hazard=True),
        _spec_case("nesting-900", "structure", r"field 'sky.secrets.0'", spec_text(**{"sky.secrets": "[" * 900 + "]" * 900})),
        _spec_case("alias-bomb", "structure", r"unknown field 'bomb'",
                   spec_text() + "bomb: &a0 [x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"b{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n" for i in range(1, 9))),
        _spec_case("two-megabytes", "structure", r"over the 1\.0 MiB limit", spec_text() + "#" + "x" * (2 << 20) + "\n", hazard=True),
        _spec_case("top-level-list", "structure", r"spec must be a YAML mapping", "- name: x\n- model: y\n"),
        _spec_case("top-level-scalar", "structure", r"spec must be a YAML mapping", "42\n"),
        _spec_case("empty", "structure", r"spec must be a YAML mapping", ""),
        _spec_case("python-tag", "structure", r"malformed YAML", spec_text() + "x: !!python/object/apply:os.system [echo hi]\n"),
        _spec_case("unknown-field", "structure", r"unknown field 'epoch'", spec_text() + "epoch: 2\n"),
        _spec_case("tab-indent", "structure", r"malformed YAML", spec_text().replace("  path:", "\tpath:")),
        _spec_case("key-10k", "structure", r"malformed YAML|unknown field", spec_text() + "k" * 10_000 + ": 1\n"),
        _spec_case("section-not-a-mapping", "structure", r"field 'train'", spec_text() + "train: fast\n"),
    ]
    return cases


def flags() -> list[Case]:
    """Flags of plan, launch and the other commands, and the global --db and --state-dir."""
    cases = []

    def plan_flag(id, expect, *args):
        cases.append(Case(f"plan{id}", "flag", expect, plan=args, launch=None, recipe=None))

    def launch_flag(id, expect, *args, hazard=False):
        cases.append(Case(f"launch{id}", "flag", expect, plan=None, launch=args, recipe=None, hazard=hazard))

    for value in ("0", "-1", "abc", "1.5", ""):
        plan_flag(f"--top={value}", r"Invalid value for '--top'", "--top", value)
    plan_flag("--diff=/dev/zero", r"spec file /dev/zero is a character device", "--diff", "/dev/zero")
    plan_flag("--diff=missing", r"spec file not found", "--diff", "{dir}/missing.yaml")
    plan_flag("--no-such-flag", r"No such option", "--no-such-flag")
    for flag, values in {"--poll-seconds": ("-1", "0", "nan", "inf", "-inf", "abc", "1e400", "1e300"),
                         "--restart-seconds": ("-1", "nan", "inf", "-inf", "abc"),
                         "--price-per-hour": ("-1", "nan", "inf", "1e30", "abc"),
                         "--simulate-preemptions": ("-1", "abc", "1000000"),
                         "--option": ("0", "-1", "abc", "99999999"),
                         "--seed": ("-1", str(2**70), "abc")}.items():
        for value in values:
            launch_flag(f"{flag}={value}", rf"Invalid value for '{flag}'", flag, value)
    launch_flag("--option=past-the-plan", r"option", "--option", "5000")
    for value, expect in (("nope", r"unknown backend"), ("lo\ncal", r"unknown backend 'lo\\ncal'"), ("x" * 1000, r"unknown backend"), ("", r"unknown backend")):
        launch_flag(f"--backend={value[:12]!r}", expect, "--backend", value)

    def global_flag(id, expect, before, files=(), hazard=False):
        cases.append(Case(f"global{id}", "flag", expect, plan=None, launch=(), recipe=None, before=before, files=files,
                          hazard=hazard))

    global_flag("--db=text-file", r"Invalid value for '--db': .* is not an SQLite database",
                ("--db", "sqlite:///{dir}/notes.txt"), files=(("notes.txt", b"not a database\n"),))
    global_flag("--db=fifo", r"Invalid value for '--db': .* not a regular file", ("--db", "sqlite:///{dir}/special"),
                files=(("special", FIFO),), hazard=True)
    global_flag("--db=directory", r"Invalid value for '--db': .* not a regular file", ("--db", "sqlite:///{dir}"))
    global_flag("--db=/dev/zero", r"Invalid value for '--db': .* not a regular file", ("--db", "sqlite:////dev/zero"), hazard=True)
    global_flag("--db=not-a-url", r"Invalid value for '--db': not a database URL", ("--db", "ledger.db"))
    global_flag("--db=mysql", r"Invalid value for '--db': mysql://u:\*\*\*@127.0.0.1/x: the ledger runs on SQLite or PostgreSQL",
                ("--db", f"mysql://u:{SECRET}@127.0.0.1/x"))
    global_flag("--db=password-in-a-bad-url", r"Invalid value for '--db': not a database URL \(",
                ("--db", f"postgresql:/u:{SECRET}@host"))
    global_flag("--db=long-component", r"Invalid value for '--db': .* not a usable path", ("--db", "sqlite:///{dir}/" + "l" * 300))
    global_flag("--state-dir=a-file", r"Invalid value for '--state-dir': .* is not a directory", ("--state-dir", "{dir}/spec.yaml"))
    global_flag("--state-dir=/dev/null", r"Invalid value for '--state-dir'", ("--state-dir", "/dev/null"))
    global_flag("--state-dir=long-component", r"Invalid value for '--state-dir': .* not a usable path", ("--state-dir", "{dir}/" + "s" * 300))

    def other(id, expect, *command):
        cases.append(Case(f"cmd-{id}", "flag", expect, plan=None, launch=None, recipe=None, command=command))

    for value in ("nan", "-1", "inf"):
        other(f"catalog--max-price={value}", r"Invalid value for '--max-price'", "catalog", "--max-price", value)
        other(f"cancel--wait={value}", r"Invalid value for '--wait'", "cancel", "some-job", "--wait", value)
        other(f"resume--poll-seconds={value}", r"Invalid value for '--poll-seconds'", "resume", "some-job", "--poll-seconds", value)
    for value in ("nan", "-1", "0", "inf", "1e30"):
        other(f"resume--budget={value}", r"Invalid value for '--budget'", "resume", "some-job", "--budget", value)
    other("status-job-newline", r"no job matching 'a\\nb'|ledger is empty", "status", "a\nb")
    other("ledger-job-10k", r"no job matching", "ledger", "j" * 10_000)
    other("cancel-job-escape", r"no job matching '\\x1b\[2J'|ledger is empty", "cancel", "\x1b[2J")
    return cases


def recipe_arguments() -> list[Case]:
    """The recipe's own command line, as a backend (or a person) might get it wrong."""
    def recipe_case(id, expect, *args, spec="{dir}/spec.yaml", files=()):
        return Case(f"recipe{id}", "flag", expect, spec=spec, files=files, plan=None, launch=None, recipe=args)

    return [
        recipe_case("-spec-is-a-directory", r"spec file .* is a directory", spec="{dir}"),
        recipe_case("-attempt-abc", r"argument --attempt", "--attempt", "abc"),
        recipe_case("-run-dir-is-a-file", r"run dir|run-dir|Not a directory", "--run-dir", "{dir}/spec.yaml"),
    ]


def corpus(seed: int = SEED) -> list[Case]:
    rng = random.Random(seed)
    cases = (encodings(rng) + numbers() + names_and_paths() + special_files() + data_contents(rng) + structure()
             + flags() + recipe_arguments())
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return cases


if __name__ == "__main__":
    from collections import Counter

    found = corpus()
    for kind, n in sorted(Counter(c.kind for c in found).items()):
        print(f"{kind:<14} {n}")
    print(f"{'total':<14} {len(found)}")
