"""The LM of :mod:`dplr.models.lm` as a transformers model (the ``dplr[hf]`` extra).

``DplrConfig`` / ``DplrForCausalLM`` are registered with ``AutoConfig`` and
``AutoModelForCausalLM`` under the model type ``"dplr"`` when this module is imported, so
``save_pretrained`` (safetensors) and ``AutoModelForCausalLM.from_pretrained`` work, and
``generate()`` runs through :class:`DplrCache` (prefill with the chunk ops, then one recurrent
step per token)::

    from dplr.models.hf import DplrConfig, DplrForCausalLM
    model = DplrForCausalLM(DplrConfig(mixer="kda", hidden_size=256, num_layers=4))
    out = model.generate(input_ids, max_new_tokens=20, do_sample=False)

Transformers renamed the cache argument from ``past_key_values`` to ``cache`` during the 5.x
series; the model takes and returns both names, so it works on either side of the rename.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .lm import LM, LMConfig

_LM_FIELDS = tuple(f.name for f in dataclasses.fields(LMConfig))


class DplrConfig(PretrainedConfig):
    """:class:`~dplr.models.lm.LMConfig`'s fields as a transformers config."""

    model_type = "dplr"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 6,
        head_dim: int = 128,
        expand_v: float = 1.0,
        mixer: str = "kda",
        attention_every: int = 0,
        intermediate_size: int | None = None,
        short_conv: bool = True,
        conv_size: int = 4,
        rope_theta: float | None = 10000.0,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        **kwargs,  # PretrainedConfig's own options (token ids, dtype, ...)
    ):
        fields = dict(locals())
        lm_config = LMConfig(**{name: fields[name] for name in _LM_FIELDS})  # validates, fills defaults
        for name, value in lm_config.to_dict().items():
            setattr(self, name, value)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @classmethod
    def from_lm_config(cls, config: LMConfig, **kwargs) -> DplrConfig:
        return cls(**config.to_dict(), **kwargs)

    def lm_config(self) -> LMConfig:
        return LMConfig(**{name: getattr(self, name) for name in _LM_FIELDS})


class DplrCache:
    """The LM's cache (one entry per layer) and the number of tokens it has seen."""

    def __init__(self, layers: list, seen: int):
        self.layers, self.seen = layers, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __len__(self) -> int:
        return len(self.layers)


# The output's cache field: ``cache`` after transformers' rename, ``past_key_values`` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class DplrForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DplrConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: DplrConfig):
        super().__init__(config)
        self.model = LM(config.lm_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must hand back the DplrCache this model returns, not a KV cache of its own

    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is self.model:  # the LM initialises itself as a whole (its gates and decays are special)
            self.model.reset_parameters()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: DplrCache | None = None,
        past_key_values: DplrCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """``input_ids [B, T]`` → logits ``[B, T, vocab_size]``; with a cache, ``input_ids`` are the
        tokens after it (one per sequence: the recurrent step). ``labels [B, T]`` give the
        next-token loss (``-100`` ignored). ``attention_mask`` must be all ones: padding is not
        supported (use ``cu_seqlens`` with :class:`~dplr.models.lm.LM` for ragged batches)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask with padding is not supported: pass unpadded batches")
        past = cache if cache is not None else past_key_values
        if past is not None and not isinstance(past, DplrCache):
            raise TypeError(f"cache must be a DplrCache, got {type(past).__name__}")
        if past is not None and input_ids.shape[1] == 1:
            logits, layers = self.model.step(input_ids[:, 0], past.layers)
            logits = logits[:, None]
        else:
            logits, layers = self.model(input_ids, cache=None if past is None else past.layers)
        new_cache = None
        if use_cache is not False:
            new_cache = DplrCache(layers, (0 if past is None else past.seen) + input_ids.shape[1])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: new_cache})
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: DplrCache | None = None,
        past_key_values: DplrCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **generation_state,  # generate()'s bookkeeping (positions, flags) that this model does not read
    ) -> dict:
        """With a cache, only the tokens it has not seen yet."""
        past = cache if cache is not None else past_key_values
        if past is not None:
            input_ids = input_ids[:, past.seen :]
        return dict(input_ids=input_ids, cache=past, attention_mask=attention_mask, use_cache=use_cache)


AutoConfig.register(DplrConfig.model_type, DplrConfig)
AutoModelForCausalLM.register(DplrConfig, DplrForCausalLM)
