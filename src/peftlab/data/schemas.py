"""Known dataset schemas and their mapping onto canonical columns, per data kind.

Canonical rows (what algorithms consume):
    sft         {"prompt": [messages], "completion": str}
Messages are {"role": ..., "content": ...} dicts. Every converter is a pure function row → canonical row.
"""

from __future__ import annotations

import re
from typing import Callable

from peftlab.errors import DataError


def as_messages(prompt) -> list[dict]:
    """A prompt given as text or as a message list → a message list."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def last_assistant(messages) -> str:
    """The completion of a conversational completion column: the content of its last (assistant) message."""
    if isinstance(messages, str):
        return messages
    return messages[-1]["content"]


def _prompt_completion(row):
    return {"prompt": as_messages(row["prompt"]), "completion": last_assistant(row["completion"])}


def _alpaca(row):
    instruction = str(row["instruction"]).strip()
    extra = str(row.get("input") or "").strip()  # csv files give None for an empty input
    return {"prompt": as_messages(f"{instruction}\n\n{extra}" if extra else instruction), "completion": str(row["output"])}


def _messages(row, column="messages"):
    messages = as_messages(row[column])
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"a `{column}` row must end with an assistant message")
    return {"prompt": messages[:-1], "completion": messages[-1]["content"]}


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt(row):
    messages = [{"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
    return _messages({"messages": messages})


# ---- preference and safety kinds (algo=dpo, rm, safe_dpo) --------------------------------------------------------
# Canonical rows:
#     preference  {"prompt": [messages], "chosen": str, "rejected": str}
#     safety      {"prompt": [messages], "response_0": str, "response_1": str, "better_response_id": 0|1,
#                  "safer_response_id": 0|1, "is_response_0_safe": bool, "is_response_1_safe": bool}  (PKU-SafeRLHF)

SAFETY_COLUMNS = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
                  "is_response_0_safe", "is_response_1_safe")


def _split_conversation(messages, column: str) -> tuple[list[dict], str]:
    """A conversational answer column → (the turns before the answer, the answer's text)."""
    if isinstance(messages, str):
        return [], messages
    messages = as_messages(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"column `{column}`: a message list must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def _prompt_chosen_rejected(row):
    """prompt/chosen/rejected as texts, TRL's conversational form (chosen = [assistant message]), or
    UltraFeedback-binarized (chosen/rejected = the whole conversation, user turns included)."""
    chosen_context, chosen = _split_conversation(row["chosen"], "chosen")
    _, rejected = _split_conversation(row["rejected"], "rejected")
    prompt = chosen_context or as_messages(row["prompt"])  # a full conversation carries its own prompt turns
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_transcript(text: str) -> list[dict]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` → messages."""
    parts = _HH_TURN.split(text)  # ['', 'Human', '...', 'Assistant', '...']
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _hh_rlhf(row):
    """Anthropic HH-RLHF: two whole transcripts that share every turn but the last assistant answer."""
    chosen, rejected = _hh_transcript(row["chosen"]), _hh_transcript(row["rejected"])
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant":
            raise DataError(f"column `{name}`: an HH-RLHF transcript must end with an `\\n\\nAssistant:` turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _response_id(row, column: str) -> int:
    value = row.get(column)
    if isinstance(value, bool) or value not in (0, 1):  # True/False would pass `in (0, 1)`: ids must be numbers
        raise DataError(f"column `{column}` must be 0 or 1, got {value!r}")
    return int(value)


def _safe_label(row, column: str) -> bool:
    value = row.get(column)
    if not isinstance(value, bool) and value not in (0, 1):
        raise DataError(f"column `{column}` must be true or false, got {value!r} (missing safety label?)")
    return bool(value)


def _safety(row):
    """PKU-SafeRLHF rows, checked: ids in {0, 1}, safety labels present."""
    for column in ("response_0", "response_1"):
        if not isinstance(row.get(column), str):
            raise DataError(f"column `{column}` must be a string, got {row.get(column)!r}")
    return {
        "prompt": as_messages(row["prompt"]),
        "response_0": row["response_0"],
        "response_1": row["response_1"],
        "better_response_id": _response_id(row, "better_response_id"),
        "safer_response_id": _response_id(row, "safer_response_id"),
        "is_response_0_safe": _safe_label(row, "is_response_0_safe"),
        "is_response_1_safe": _safe_label(row, "is_response_1_safe"),
    }


def _pku_better_pair(row):
    """PKU-SafeRLHF as plain preference data: the more helpful answer (`better_response_id`) is chosen."""
    better = _response_id(row, "better_response_id")
    return {"prompt": as_messages(row["prompt"]), "chosen": row[f"response_{better}"],
            "rejected": row[f"response_{1 - better}"]}


# ---- grpo kind (algo=grpo) ---------------------------------------------------------------------------------------
# Canonical rows:
#     grpo        {"prompt": [messages], "answer": str}   (the reference answer the reward functions check against)

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")


def _prompt_answer(row):
    return {"prompt": as_messages(row["prompt"]), "answer": str(row["answer"]).strip()}


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K's worked solution → its final number: the text after the last `####`, thousands commas removed."""
    match = _GSM8K_FINAL.search(str(solution))
    if match is None:
        raise DataError(f"column `answer`: a GSM8K answer must end with `#### <number>`, got ...{str(solution)[-40:]!r}")
    return match.group(1).replace(",", "").strip()


def _gsm8k(row):
    """GSM8K (openai/gsm8k): `question` → the prompt, the number after `####` in `answer` → the reference answer."""
    return {"prompt": as_messages(row["question"]), "answer": gsm8k_final_answer(row["answer"])}


# kind → ordered {schema name: (required columns, converter)}; `auto` picks the first whose columns are present.
SCHEMAS: dict[str, dict[str, tuple[tuple[str, ...], Callable[[dict], dict]]]] = {
    "sft": {
        "prompt_completion": (("prompt", "completion"), _prompt_completion),
        "alpaca": (("instruction", "output"), _alpaca),
        "messages": (("messages",), _messages),
        "sharegpt": (("conversations",), _sharegpt),
    },
    "preference": {
        "prompt_chosen_rejected": (("prompt", "chosen", "rejected"), _prompt_chosen_rejected),
        "hh_rlhf": (("chosen", "rejected"), _hh_rlhf),
        "pku_saferlhf": (SAFETY_COLUMNS, _pku_better_pair),
    },
    "safety": {
        "pku_saferlhf": (SAFETY_COLUMNS, _safety),
    },
    "grpo": {
        "prompt_answer": (("prompt", "answer"), _prompt_answer),
        "gsm8k": (("question", "answer"), _gsm8k),
    },
}


def detect(kind: str, columns: list[str], requested: str = "auto") -> str:
    """Choose the schema for a dataset's columns, or raise DataError with a message that names the columns."""
    known = SCHEMAS[kind]
    if requested != "auto":
        if requested not in known:
            raise DataError(f"data.schema={requested} is not a {kind} schema; choose one of: auto, {', '.join(known)}")
        missing = [c for c in known[requested][0] if c not in columns]
        if missing:
            raise DataError(f"data.schema={requested} needs column(s) {missing}, the data has {sorted(columns)}")
        return requested
    for name, (required, _) in known.items():
        if all(c in columns for c in required):
            return name
    expected = "; ".join(f"{n}: {'+'.join(req)}" for n, (req, _) in known.items())
    raise DataError(
        f"unknown dataset columns {sorted(columns)} for {kind} data (expected {expected}); "
        "rename the columns or set data.schema="
    )


def convert(kind: str, schema: str, row: dict) -> dict:
    return SCHEMAS[kind][schema][1](row)
