"""Reward and cost models as frozen scorers: `Scorer(path).score(prompts, completions) -> (N,) float32 tensor`.

Where a scorer comes from (`algo.reward_model`, `algo.cost_model`):

* a run directory of `algo=rm`: `.hydra/config.yaml` plus `adapter/` (LoRA, score head included) or `model/`
  (peft=none). Its base is rebuilt exactly as the run built it (checkpoint + starting adapter merged in);
* a local directory or a hub id of any `AutoModelForSequenceClassification` with one label.

How it is held:

* `Scorer` — loaded on its own, frozen, in the compute dtype. Costs a whole model.
* `SharedScorer` — when the scorer's run trained a LoRA adapter on exactly the policy's frozen base (same
  checkpoint, same starting adapter merged in, same quantization) and the policy is a LoRA model. Its LoRA weights
  become one more (frozen) adapter on the policy's own base — peft multi-adapter — and its score head a small
  Linear beside it. Scoring makes that adapter active, runs the shared transformer body, reads the head at the last
  token and makes the policy's adapter active again. Costs the adapter and the head: no second base.

Prompts are message lists (or texts); completions are texts. Both kinds tokenize them with the chat template the
way `algo=rm` did in training (`peftlab.data.format.encode_prompt_completion`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from peftlab.data.format import collate_lm, encode_prompt_completion
from peftlab.data.schemas import as_messages
from peftlab.errors import ConfigError
from peftlab.models import (DTYPES, PolicyIdentity, active_adapter, build_base, load_pretrained, policy_identity,
                            train_dtype)
from peftlab.sampling import eval_mode, forked_rng, unwrap

ADAPTER_METHODS = ("lora", "dora", "qlora")
HEAD_NAMES = ("score", "classifier")  # what sequence-classification models call their head (peft saves it by name)


@dataclass
class ScorerSource:
    """A resolved `algo.reward_model` / `algo.cost_model` value (nothing loaded yet but configs and tokenizer)."""

    key: str                      # the config key it came from, for error messages
    path: str                     # as given
    run_cfg: object = None        # the algo=rm run's config (OmegaConf) when `path` is a run directory
    adapter_dir: Path | None = None   # the run's LoRA adapter (with the score head)
    model_dir: str | None = None      # a whole sequence-classification model: dir or hub id
    tokenizer_dir: str = ""           # where its tokenizer is

    @property
    def identity(self) -> PolicyIdentity | None:
        """The policy identity of the algo=rm run that trained this adapter (None for a whole model)."""
        if self.adapter_dir is None:
            return None
        cfg = self.run_cfg
        return policy_identity(cfg.model, cfg.peft, cfg.algo.start_from)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def vocab_size(self) -> int:
        """Rows of the model's token embedding, read from its config (no weights loaded)."""
        from transformers import AutoConfig

        name = self.model_dir or str(self.run_cfg.model.name_or_path)
        return int(AutoConfig.from_pretrained(name).vocab_size)


def _fail(source_key: str, path, message: str) -> ConfigError:
    return ConfigError(f"{source_key}={path}: {message}")


def inspect_source(path, key: str = "scorer") -> ScorerSource:
    """Resolve a scorer path without loading weights; ConfigError (one line, naming the path) when it is unusable."""
    given = str(path)
    local = Path(given).expanduser()
    if local.name in ("adapter", "model") and (local.parent / ".hydra" / "config.yaml").exists():
        local = local.parent  # the run's output folder was given: use its run directory
    if (local / ".hydra" / "config.yaml").exists():
        run_cfg = OmegaConf.load(local / ".hydra" / "config.yaml")
        adapter, full = local / "adapter", local / "model"
        if (adapter / "adapter_config.json").exists():
            task_type = json.loads((adapter / "adapter_config.json").read_text()).get("task_type")
            if task_type != "SEQ_CLS":
                raise _fail(key, given, f"its adapter is a {task_type} adapter, not a reward/cost model "
                                        "(train one with algo=rm)")
            return ScorerSource(key, given, run_cfg, adapter_dir=adapter, tokenizer_dir=str(adapter))
        if (full / "config.json").exists():
            return ScorerSource(key, given, run_cfg, model_dir=str(full), tokenizer_dir=str(full))
        raise _fail(key, given, "this run has no adapter/ or model/ (did the algo=rm run finish?)")
    if (local / "config.json").exists():
        return ScorerSource(key, given, model_dir=str(local), tokenizer_dir=str(local))
    if local.exists() or given.startswith(("/", ".", "~")) or given.count("/") != 1:
        raise _fail(key, given, "not a run directory of algo=rm (no .hydra/config.yaml) nor a model directory "
                                "(no config.json)")
    try:  # a hub id: check that its config can be had (cache or network) before any weight is loaded
        from transformers import AutoConfig

        AutoConfig.from_pretrained(given)
    except Exception as err:  # offline / no such repo: both end in the same advice
        raise _fail(key, given, f"not a local directory and not loadable from the hub ({type(err).__name__}); "
                                "download it and pass its local directory") from err
    return ScorerSource(key, given, model_dir=given, tokenizer_dir=given)


def can_share(source: ScorerSource, policy: PolicyIdentity) -> bool:
    """True when the scorer is a LoRA adapter trained on exactly the policy's frozen base, and the policy has one."""
    return (source.adapter_dir is not None and policy.peft_method in ADAPTER_METHODS
            and source.run_cfg.peft.method in ADAPTER_METHODS and source.identity.same_base(policy))


def check_tokenizer(source: ScorerSource, policy_tokenizer, shared: bool) -> None:
    """The scorer's tokenizer must fit its own model, and be the policy's own when the two share a base."""
    try:
        tokenizer = source.load_tokenizer()
    except Exception as err:
        raise _fail(source.key, source.path, f"cannot load its tokenizer from {source.tokenizer_dir} "
                                             f"({type(err).__name__})") from err
    if len(tokenizer) > source.vocab_size():
        raise _fail(source.key, source.path, f"its tokenizer ({len(tokenizer)} tokens, {source.tokenizer_dir}) does "
                                             f"not match its model ({source.vocab_size()} embeddings)")
    if shared and tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise _fail(source.key, source.path, f"its tokenizer ({len(tokenizer)} tokens, {source.tokenizer_dir}) does "
                                             f"not match the policy's ({len(policy_tokenizer)} tokens) although both "
                                             "were trained on the same base checkpoint")


class Scorer:
    """A frozen scalar-head model: `score(prompts, completions)` → (N,) float32 on the CPU.

    Loaded on its own (no sharing): an algo=rm run's base rebuilt as the run built it plus its adapter, or a whole
    sequence-classification model. `dtype` is the compute dtype (None: the source's own / the run's precision).
    """

    def __init__(self, path=None, device="cpu", dtype: torch.dtype | None = None, max_length: int = 512,
                 batch_size: int = 32, source: ScorerSource | None = None):
        self.source = source or inspect_source(path)
        self.device = torch.device(device)
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        self.tokenizer = self.source.load_tokenizer()
        self.model = self._load(dtype).eval().requires_grad_(False)
        # The head reads the last token that is not padding: make "padding" the id our collator pads with.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _load(self, dtype):
        from transformers import AutoModelForSequenceClassification

        source = self.source
        if source.adapter_dir is not None:
            from peft import PeftModel

            cfg = source.run_cfg
            compute = train_dtype(cfg.trainer.precision, self.device)  # as the algo=rm run computed
            model_cfg = cfg.model if dtype is None else \
                OmegaConf.merge(cfg.model, {"dtype": next(name for name, d in DTYPES.items() if d == dtype)})
            base = build_base(model_cfg, cfg.peft, compute=compute, device=self.device, head="score")
            return PeftModel.from_pretrained(base, str(source.adapter_dir))
        if source.run_cfg is not None:  # a peft=none run: model/ is the whole trained model
            return load_pretrained(source.model_dir, source.run_cfg.model, dtype, self.device,
                                   model_class=AutoModelForSequenceClassification)
        return AutoModelForSequenceClassification.from_pretrained(source.model_dir, dtype=dtype).to(self.device)

    def encode(self, prompts: list, completions: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids and attention_mask (N, L) of prompt + completion, as algo=rm trained on."""
        encoded = [encode_prompt_completion(self.tokenizer, as_messages(p), c, self.max_length)
                   for p, c in zip(prompts, completions)]
        batch = collate_lm(encoded, self.tokenizer.pad_token_id)
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) → (B,) scores."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str]) -> torch.Tensor:
        """(N,) float32 scores of each completion to its prompt (higher = more reward, or more cost)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.encode(prompts[start:start + self.batch_size], completions[start:start + self.batch_size])
            scores.append(self.forward(**batch).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


class SharedScorer(Scorer):
    """A scorer held as an extra frozen adapter (plus its score head) on the policy's own base.

    policy: the PeftModel being trained (its active adapter is the policy's own, `default`).
    name: the adapter name to register (e.g. "reward", "cost").
    """

    def __init__(self, source: ScorerSource, policy, name: str, tokenizer, max_length: int = 512,
                 batch_size: int = 32):
        from peft import LoraConfig
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        self.source, self.name = source, name
        self.tokenizer, self.max_length, self.batch_size = tokenizer, int(max_length), int(batch_size)
        self.peft_model = unwrap(policy)
        self.body = self.peft_model.get_base_model().base_model  # the transformer without its LM head
        self.device = next(self.body.parameters()).device

        config = LoraConfig.from_pretrained(str(source.adapter_dir))
        config.task_type = "CAUSAL_LM"  # it now lives on the policy's causal LM ...
        config.modules_to_save = None  # ... and its score head beside it, not inside (the LM has no `score`)
        config.inference_mode = True
        self.peft_model.add_adapter(name, config)
        weights = load_peft_weights(str(source.adapter_dir), device=str(self.device))
        lora = {k: v for k, v in weights.items() if ".lora_" in k}
        head = {k.rsplit(".", 1)[1]: v for k, v in weights.items() if k.rsplit(".", 2)[1] in HEAD_NAMES}
        result = set_peft_model_state_dict(self.peft_model, lora, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"{source.key}={source.path}: adapter weights do not fit the policy's model "
                              f"({result.unexpected_keys[:2]}...)")
        for param_name, param in self.peft_model.named_parameters():
            if f".{name}." in param_name:
                param.requires_grad_(False)
        if "weight" not in head:
            raise ConfigError(f"{source.key}={source.path}: the adapter holds no score head (was it saved by algo=rm?)")
        dtype = next(p for p in self.body.parameters() if p.is_floating_point()).dtype
        self.head = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0], bias="bias" in head)
        self.head.load_state_dict(head)
        self.head.to(self.device, dtype).requires_grad_(False)

    def forward(self, input_ids, attention_mask):
        with eval_mode(self.body), active_adapter(self.peft_model, self.name):
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        # the last real token of each (right-padded) row: the highest position whose mask is 1
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)  # (B,)
        pooled = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, H)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)  # (B,)


def load_scorer(source: ScorerSource, *, policy=None, shared: bool = False, name: str = "scorer", tokenizer=None,
                device="cpu", dtype=None, max_length: int = 512, batch_size: int = 32) -> Scorer:
    """A `SharedScorer` on `policy` when `shared`, else a separately loaded `Scorer`."""
    if shared:
        return SharedScorer(source, policy, name, tokenizer, max_length, batch_size)
    return Scorer(device=device, dtype=dtype, max_length=max_length, batch_size=batch_size, source=source)


@dataclass
class ScorerPlan:
    """A resolved scorer role (reward or cost): where it comes from and whether it shares the policy's base."""

    source: ScorerSource
    shared: bool


def plan_scorers(paths: dict[str, str | None], policy: PolicyIdentity, *, share_base: bool,
                 tokenizer) -> dict[str, ScorerPlan]:
    """{role: path} (algo.reward_model, algo.cost_model) → resolved plans, checked before any weight loads (a bad
    path or a tokenizer that does not fit is a one-line ConfigError naming the key)."""
    plans = {}
    for role, path in paths.items():
        if not path:
            continue
        source = inspect_source(path, key=f"algo.{role}_model")
        shared = share_base and can_share(source, policy)
        check_tokenizer(source, tokenizer, shared)
        plans[role] = ScorerPlan(source, shared)
    return plans


def load_scorers(plans: dict[str, ScorerPlan], *, policy, tokenizer, device, max_length: int,
                 batch_size: int) -> dict[str, Scorer]:
    """Load each planned scorer: as an adapter on `policy` when it shares its base, else separately in the base's
    dtype. Loading initializes modules before their weights arrive, which draws random numbers: the RNG is forked
    so that a run (its samples, hence safe_dpo's λ) is the same whether the scorers share the base or not."""
    dtype = next(p for p in unwrap(policy).parameters() if p.is_floating_point()).dtype
    loaded = {}
    for role, plan in plans.items():
        with forked_rng(0, device):
            loaded[role] = load_scorer(plan.source, policy=policy, shared=plan.shared, name=role, tokenizer=tokenizer,
                                       device=device, dtype=dtype, max_length=max_length, batch_size=batch_size)
        how = "as an adapter on the policy's base" if plan.shared else "separately"
        print(f"{role} model {plan.source.path} loaded {how}")
    return loaded
