//! Cross-field validation: every problem is collected, each naming the file and dotted key.

use std::collections::BTreeSet;
use std::path::Path;

use crate::{ModelFamily, Recipe, SourceFormat, ValidationError, parse_duration};

struct Errors<'a> {
    path: &'a Path,
    list: Vec<ValidationError>,
}

impl Errors<'_> {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(ValidationError {
            path: self.path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        });
    }

    fn check(&mut self, ok: bool, key: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.push(key, message);
        }
    }
}

impl Recipe {
    /// Checks every cross-field rule and returns all violations (empty: valid).
    pub fn validate(&self, path: &Path) -> Result<(), Vec<ValidationError>> {
        let mut e = Errors {
            path,
            list: Vec::new(),
        };
        self.validate_run(&mut e);
        self.validate_model(&mut e);
        self.validate_data(&mut e);
        self.validate_phases(&mut e);
        self.validate_optim(&mut e);
        self.validate_adapter(&mut e);
        self.validate_dream(&mut e);
        self.validate_distributed(&mut e);
        if e.list.is_empty() {
            Ok(())
        } else {
            Err(e.list)
        }
    }

    fn validate_run(&self, e: &mut Errors<'_>) {
        let name = &self.run.name;
        e.check(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !name.starts_with('.'),
            "run.name",
            format!("`{name}` must be non-empty and use only letters, digits, `-`, `_` and `.`"),
        );
        e.check(
            !self.run.out_dir.is_empty(),
            "run.out_dir",
            "must not be empty",
        );
        if self.run.max_wall_time != "none"
            && let Err(msg) = parse_duration(&self.run.max_wall_time)
        {
            e.push(
                "run.max_wall_time",
                format!("{msg} (or `none` for no limit)"),
            );
        }
        let device = self.run.device.as_str();
        match self.run.backend {
            crate::BackendKind::Flex | crate::BackendKind::Ndarray => e.check(
                device == "cpu",
                "run.device",
                format!(
                    "`{device}` is not a device of the `{}` backend (use `cpu`)",
                    self.run.backend.as_str()
                ),
            ),
            crate::BackendKind::Cuda => e.check(
                device == "cuda"
                    || device
                        .strip_prefix("cuda:")
                        .is_some_and(|n| n.parse::<usize>().is_ok()),
                "run.device",
                format!("`{device}` is not a CUDA device (use `cuda` or `cuda:N`)"),
            ),
            crate::BackendKind::Wgpu => e.check(
                crate::WgpuDeviceSpec::parse(device).is_some(),
                "run.device",
                format!(
                    "`{device}` is not a wgpu device (use `default`, `discrete:N`, \
                     `integrated:N`, `virtual:N`, or `software` for a CPU driver such as lavapipe)"
                ),
            ),
        }
    }

    /// What is allowed but probably unintended, each naming the file and key.
    pub fn warnings(&self, path: &Path) -> Vec<ValidationError> {
        let mut e = Errors {
            path,
            list: Vec::new(),
        };
        e.check(
            self.run.fusion
                || matches!(
                    self.run.backend,
                    crate::BackendKind::Cuda | crate::BackendKind::Wgpu
                ),
            "run.fusion",
            format!(
                "`false` has no effect on the `{}` backend: only `cuda` and `wgpu` fuse",
                self.run.backend.as_str()
            ),
        );
        if !self.train.varying_tokens_per_step
            && let Some(first) = self.phases.first()
        {
            let want = self.tokens_per_step(first);
            for (i, p) in self.phases.iter().enumerate().skip(1) {
                let got = self.tokens_per_step(p);
                e.check(
                    got == want,
                    format!("phases[{i}]"),
                    format!(
                        "{got} tokens per step (batch {} x window {} x accum {}) differs from phases[0]'s {want}: the gradient noise and the effective learning rate change between phases; set `train.varying_tokens_per_step = true` if that is intended",
                        p.batch_size, p.window, self.train.grad_accum
                    ),
                );
            }
        }
        e.list
    }

    fn validate_distributed(&self, e: &mut Errors<'_>) {
        let Some(d) = &self.distributed else {
            return;
        };
        e.check(d.nodes >= 1, "distributed.nodes", "must be at least 1");
        e.check(
            d.devices_per_node >= 1,
            "distributed.devices_per_node",
            "must be at least 1",
        );
        let world = d.nodes.max(1) * d.devices_per_node.max(1);
        e.check(
            d.rank < world,
            "distributed.rank",
            format!(
                "{} is outside 0..{world} (nodes {} x devices_per_node {})",
                d.rank, d.nodes, d.devices_per_node
            ),
        );
        e.check(
            matches!(d.strategy.as_str(), "tree" | "ring" | "centralized"),
            "distributed.strategy",
            format!("`{}` is not one of tree, ring, centralized", d.strategy),
        );
        e.check(
            d.orchestrator
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
            "distributed.orchestrator",
            format!("`{}` is not `host:port`", d.orchestrator),
        );
        e.check(
            d.timeout_s.is_finite() && d.timeout_s > 0.0,
            "distributed.timeout_s",
            format!("{} must be a positive number of seconds", d.timeout_s),
        );
    }

    fn validate_dream(&self, e: &mut Errors<'_>) {
        let Some(d) = &self.dream else {
            return;
        };
        e.check(d.every > 0, "dream.every", "must be at least 1");
        e.check(
            (0.0..1.0).contains(&d.ema),
            "dream.ema",
            format!("{} must be in [0, 1)", d.ema),
        );
        for (key, v) in [
            ("crystallize_below", d.crystallize_below),
            ("dissolve_above", d.dissolve_above),
            ("prune_below", d.prune_below),
        ] {
            e.check(
                v.is_finite() && v >= 0.0,
                format!("dream.{key}"),
                format!("{v} must not be negative"),
            );
        }
        e.check(
            d.crystallize_below <= d.dissolve_above,
            "dream.crystallize_below",
            format!(
                "{} exceeds dream.dissolve_above {}",
                d.crystallize_below, d.dissolve_above
            ),
        );
        for (key, v, below) in [
            ("crystallize_factor", d.crystallize_factor, true),
            ("prune_factor", d.prune_factor, true),
            ("dissolve_factor", d.dissolve_factor, false),
        ] {
            let ok = v > 0.0
                && if below {
                    v <= 1.0
                } else {
                    v >= 1.0 && v.is_finite()
                };
            e.check(
                ok,
                format!("dream.{key}"),
                format!(
                    "{v} must be {}",
                    if below { "in (0, 1]" } else { "at least 1" }
                ),
            );
        }
        e.check(
            d.min_multiplier > 0.0 && d.min_multiplier <= 1.0,
            "dream.min_multiplier",
            format!("{} must be in (0, 1]", d.min_multiplier),
        );
        e.check(
            d.max_multiplier >= 1.0 && d.max_multiplier.is_finite(),
            "dream.max_multiplier",
            format!("{} must be at least 1", d.max_multiplier),
        );
    }

    fn validate_model(&self, e: &mut Errors<'_>) {
        for (family, key, present) in [
            (ModelFamily::Moa, "model.moa", self.model.moa.is_some()),
            (
                ModelFamily::Convgpt,
                "model.convgpt",
                self.model.convgpt.is_some(),
            ),
        ] {
            if self.model.family != family && present {
                e.push(
                    key,
                    format!(
                        "applies to `family = \"{}\"`, not `{}`",
                        family.as_str(),
                        self.model.family.as_str()
                    ),
                );
            }
        }
        if self.model.family != ModelFamily::Qwen2 {
            if self.model.qwen2.is_some() {
                e.push(
                    "model.qwen2",
                    format!(
                        "applies to `family = \"qwen2\"`, not `{}`",
                        self.model.family.as_str()
                    ),
                );
            }
            if self.adapter.is_some() {
                e.push(
                    "adapter",
                    "LoRA adapters apply to the `qwen2` family (a pretrained base to adapt)",
                );
            }
        }
        match self.model.family {
            ModelFamily::Moa => self.validate_moa(e),
            ModelFamily::Convgpt => self.validate_convgpt(e),
            ModelFamily::Qwen2 => {
                let Some(q) = &self.model.qwen2 else {
                    e.push(
                        "model.qwen2",
                        "missing: `family = \"qwen2\"` needs a `[model.qwen2]` table",
                    );
                    return;
                };
                let set = q.architecture_keys();
                if q.hf_dir.is_some() {
                    for (key, present) in set {
                        if present {
                            e.push(
                                format!("model.qwen2.{key}"),
                                "comes from the `config.json` of `hf_dir`; remove it from the recipe",
                            );
                        }
                    }
                    return;
                }
                if q.init == Some(crate::InitKind::Pretrained) {
                    e.push("model.qwen2.init", "`pretrained` needs `hf_dir`");
                }
                for (key, present) in &set[..6] {
                    if !present {
                        e.push(format!("model.qwen2.{key}"), "missing (or give `hf_dir`)");
                    }
                }
                let (Some(hidden), Some(heads), Some(kv)) =
                    (q.hidden_size, q.num_attention_heads, q.num_key_value_heads)
                else {
                    return;
                };
                for (key, v) in [
                    ("vocab_size", q.vocab_size),
                    ("hidden_size", q.hidden_size),
                    ("intermediate_size", q.intermediate_size),
                    ("num_hidden_layers", q.num_hidden_layers),
                    ("num_attention_heads", q.num_attention_heads),
                    ("num_key_value_heads", q.num_key_value_heads),
                    ("max_position_embeddings", q.max_position_embeddings),
                ] {
                    e.check(
                        v != Some(0),
                        format!("model.qwen2.{key}"),
                        "must be at least 1",
                    );
                }
                if heads > 0 && hidden % heads != 0 {
                    e.push(
                        "model.qwen2.hidden_size",
                        format!("{hidden} is not divisible by num_attention_heads {heads}"),
                    );
                } else if heads > 0 && (hidden / heads) % 2 != 0 {
                    e.push(
                        "model.qwen2.hidden_size",
                        format!(
                            "head dimension {} must be even for rotary embeddings",
                            hidden / heads
                        ),
                    );
                }
                if kv > 0 && heads % kv != 0 {
                    e.push(
                        "model.qwen2.num_key_value_heads",
                        format!("{kv} does not divide num_attention_heads {heads}"),
                    );
                }
                for (key, v) in [
                    ("rope_theta", q.rope_theta),
                    ("rms_norm_eps", q.rms_norm_eps),
                    ("initializer_range", q.initializer_range),
                ] {
                    e.check(
                        v.is_none_or(|v| v > 0.0),
                        format!("model.qwen2.{key}"),
                        "must be positive",
                    );
                }
            }
        }
    }

    fn validate_convgpt(&self, e: &mut Errors<'_>) {
        let Some(c) = &self.model.convgpt else {
            e.push(
                "model.convgpt",
                "missing: `family = \"convgpt\"` needs a `[model.convgpt]` table",
            );
            return;
        };
        for (key, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("num_layers", c.num_layers),
            ("intermediate_size", c.intermediate_size),
            ("num_heads", c.num_heads),
            ("conv_kernel", c.conv_kernel),
            ("memory_chunk", c.memory_chunk),
            ("memory_top_k", c.memory_top_k),
        ] {
            e.check(v > 0, format!("model.convgpt.{key}"), "must be at least 1");
        }
        e.check(
            c.conv2d_kernel % 2 == 1,
            "model.convgpt.conv2d_kernel",
            format!(
                "{} must be odd (the window is centred on the token's cell)",
                c.conv2d_kernel
            ),
        );
        e.check(
            (1..=15).contains(&c.grid_order),
            "model.convgpt.grid_order",
            format!(
                "{} must be in 1..=15 (a 2^order x 2^order grid)",
                c.grid_order
            ),
        );
        if c.num_heads > 0 && c.hidden_size % c.num_heads != 0 {
            e.push(
                "model.convgpt.hidden_size",
                format!(
                    "{} is not divisible by num_heads {}",
                    c.hidden_size, c.num_heads
                ),
            );
        } else if c.num_heads > 0 && (c.hidden_size / c.num_heads) % 2 != 0 {
            e.push(
                "model.convgpt.hidden_size",
                format!(
                    "head dimension {} must be even for rotary embeddings",
                    c.hidden_size / c.num_heads
                ),
            );
        }
        for (key, v) in [
            ("rope_theta", c.rope_theta),
            ("rms_norm_eps", c.rms_norm_eps),
            ("initializer_range", c.initializer_range),
        ] {
            e.check(
                v.is_finite() && v > 0.0,
                format!("model.convgpt.{key}"),
                format!("{v} must be positive"),
            );
        }
    }

    fn validate_moa(&self, e: &mut Errors<'_>) {
        let Some(m) = &self.model.moa else {
            e.push(
                "model.moa",
                "missing: `family = \"moa\"` needs a `[model.moa]` table",
            );
            return;
        };
        for (key, v) in [
            ("vocab_size", m.vocab_size),
            ("hidden_size", m.hidden_size),
            ("num_layers", m.num_layers),
            ("num_heads", m.num_heads),
            ("intermediate_size", m.intermediate_size),
            ("conv_kernel", m.conv_kernel),
            ("max_position_embeddings", m.max_position_embeddings),
            ("ffn_rank", m.ffn_rank.unwrap_or(1)),
        ] {
            e.check(v > 0, format!("model.moa.{key}"), "must be at least 1");
        }
        if m.num_heads > 0 && m.hidden_size % m.num_heads != 0 {
            e.push(
                "model.moa.hidden_size",
                format!(
                    "{} is not divisible by num_heads {}",
                    m.hidden_size, m.num_heads
                ),
            );
        } else if m.num_heads > 0 && (m.hidden_size / m.num_heads) % 2 != 0 {
            e.push(
                "model.moa.hidden_size",
                format!(
                    "head dimension {} must be even for rotary embeddings",
                    m.hidden_size / m.num_heads
                ),
            );
        }
        e.check(
            (1..=3).contains(&m.top_k),
            "model.moa.top_k",
            format!(
                "{} must be 1, 2 or 3 (the HyperFFN has three experts)",
                m.top_k
            ),
        );
        e.check(
            (0.0..1.0).contains(&m.drop_path),
            "model.moa.drop_path",
            format!("{} must be in [0, 1)", m.drop_path),
        );
        for (key, v) in [
            ("rope_theta", m.rope_theta),
            ("rms_norm_eps", m.rms_norm_eps),
            ("initializer_range", m.initializer_range),
        ] {
            e.check(
                v.is_finite() && v > 0.0,
                format!("model.moa.{key}"),
                format!("{v} must be positive"),
            );
        }
        for (key, v) in [
            ("energy_beta", m.energy_beta),
            ("ball_sharpness", m.ball_sharpness),
            ("triangle_weight", m.triangle_weight),
            ("balance_weight", m.balance_weight),
        ] {
            e.check(
                v.is_finite() && v >= 0.0,
                format!("model.moa.{key}"),
                format!("{v} must not be negative"),
            );
        }
        e.check(
            m.energy_beta < 1.0,
            "model.moa.energy_beta",
            format!(
                "{} must be below 1 (the gate 1 + beta * tanh(.) must stay positive)",
                m.energy_beta
            ),
        );
        e.check(
            m.triangle_weight == 0.0 || m.triangle_samples > 0,
            "model.moa.triangle_samples",
            "must be at least 1 when triangle_weight is set",
        );
    }

    fn validate_data(&self, e: &mut Errors<'_>) {
        let t = &self.tokenizer;
        match t.kind {
            crate::TokenizerKind::Hf => e.check(
                t.path.is_some(),
                "tokenizer.path",
                "missing: `kind = \"hf\"` needs the path of a tokenizer.json (or its directory)",
            ),
            crate::TokenizerKind::Bytes => {
                for (key, set) in [
                    ("path", t.path.is_some()),
                    ("eos", t.eos.is_some()),
                    ("pad", t.pad.is_some()),
                ] {
                    e.check(
                        !set,
                        format!("tokenizer.{key}"),
                        "applies to `kind = \"hf\"` only",
                    );
                }
            }
        }
        e.check(
            (0.0..1.0).contains(&self.data.eval_holdout),
            "data.eval_holdout",
            format!("{} must be in [0, 1)", self.data.eval_holdout),
        );
        e.check(
            !self.data.sources.is_empty(),
            "data.sources",
            "at least one source is needed",
        );
        let mut seen = BTreeSet::new();
        for (i, s) in self.data.sources.iter().enumerate() {
            let key = format!("data.sources[{i}]");
            e.check(
                !s.name.is_empty(),
                format!("{key}.name"),
                "must not be empty",
            );
            if !seen.insert(s.name.as_str()) {
                e.push(
                    format!("{key}.name"),
                    format!("`{}` is used by two sources", s.name),
                );
            }
            e.check(
                !s.path.is_empty(),
                format!("{key}.path"),
                "must not be empty",
            );
            e.check(
                !s.text_field.is_empty(),
                format!("{key}.text_field"),
                "must not be empty",
            );
            if let Some(t) = &s.template {
                if let Err(m) = crate::template_fields(t) {
                    e.push(format!("{key}.template"), m);
                }
                if s.format == SourceFormat::Text {
                    e.push(
                        format!("{key}.template"),
                        "applies to jsonl, parquet and arrow rows, not `text`",
                    );
                }
                if s.messages_field.is_some() {
                    e.push(
                        format!("{key}.template"),
                        "give `template` or `messages_field`, not both",
                    );
                }
            }
            if let Some(n) = s.epochs {
                e.check(n > 0, format!("{key}.epochs"), "must be at least 1");
                e.check(
                    s.on_exhausted == crate::Exhausted::Stop,
                    format!("{key}.epochs"),
                    "applies with `on_exhausted = \"stop\"` (a restarting source has no last epoch)",
                );
            }
            if let (Some(lo), Some(hi)) = (s.min_tokens, s.max_tokens) {
                e.check(
                    lo <= hi,
                    format!("{key}.min_tokens"),
                    format!("{lo} exceeds max_tokens {hi}"),
                );
            }
        }
    }

    fn validate_phases(&self, e: &mut Errors<'_>) {
        e.check(
            !self.phases.is_empty(),
            "phases",
            "at least one `[[phases]]` entry is needed",
        );
        let names: BTreeSet<&str> = self.data.sources.iter().map(|s| s.name.as_str()).collect();
        let max_pos = self.model_max_position();
        for (i, p) in self.phases.iter().enumerate() {
            let key = |k: &str| format!("phases[{i}].{k}");
            e.check(
                !p.sources.is_empty(),
                key("sources"),
                "at least one source is needed",
            );
            for (name, w) in &p.sources {
                if !names.contains(name.as_str()) {
                    let known: Vec<&str> = names.iter().copied().collect();
                    e.push(
                        key(&format!("sources.{name}")),
                        format!("no source named `{name}` (known: {})", known.join(", ")),
                    );
                }
                e.check(
                    w.is_finite() && *w > 0.0,
                    key(&format!("sources.{name}")),
                    format!("weight {w} must be positive"),
                );
            }
            e.check(p.batch_size > 0, key("batch_size"), "must be at least 1");
            e.check(
                p.window >= 2,
                key("window"),
                format!("{} must be at least 2", p.window),
            );
            if let Some(max) = max_pos {
                e.check(
                    p.window <= max,
                    key("window"),
                    format!("{} exceeds model max_position {max}", p.window),
                );
            }
            if p.overlap > 0 {
                e.check(
                    p.windowing == crate::Windowing::Belt,
                    key("overlap"),
                    format!(
                        "overlap applies to `belt` windowing, not `{}`",
                        p.windowing.as_str()
                    ),
                );
                e.check(
                    p.overlap < p.window,
                    key("overlap"),
                    format!("{} must be smaller than the window {}", p.overlap, p.window),
                );
            }
            let lengths = [p.steps.is_some(), p.tokens.is_some(), p.epochs.is_some()];
            match lengths.iter().filter(|l| **l).count() {
                0 => e.push(key("steps"), "missing: give `steps`, `tokens` or `epochs`"),
                1 => {}
                _ => e.push(
                    key("steps"),
                    "give one of `steps`, `tokens` and `epochs`, not several",
                ),
            }
            if p.steps == Some(0) || p.tokens == Some(0) {
                e.push(key("steps"), "phase length must be positive");
            }
            if let Some(n) = p.epochs {
                e.check(
                    n.is_finite() && n > 0.0,
                    key("epochs"),
                    format!("{n} must be a positive number of passes"),
                );
            }
            e.check(
                p.lr_scale.is_finite() && p.lr_scale > 0.0,
                key("lr_scale"),
                format!("{} must be positive", p.lr_scale),
            );
        }
        if let (Some(max), Some(w)) = (max_pos, self.train.eval_window) {
            e.check(
                w <= max,
                "train.eval_window",
                format!("{w} exceeds model max_position {max}"),
            );
        }
    }

    fn validate_adapter(&self, e: &mut Errors<'_>) {
        let Some(a) = &self.adapter else {
            return;
        };
        e.check(a.rank > 0, "adapter.rank", "must be at least 1");
        e.check(
            a.alpha.is_finite() && a.alpha > 0.0,
            "adapter.alpha",
            format!("{} must be positive", a.alpha),
        );
        e.check(
            (0.0..1.0).contains(&a.dropout),
            "adapter.dropout",
            format!("{} must be in [0, 1)", a.dropout),
        );
        e.check(
            !a.targets.is_empty(),
            "adapter.targets",
            "at least one projection is needed",
        );
        for (i, t) in a.targets.iter().enumerate() {
            if !crate::LORA_TARGETS.contains(&t.as_str()) {
                e.push(
                    format!("adapter.targets[{i}]"),
                    format!(
                        "unknown projection `{t}` (expected one of {})",
                        crate::LORA_TARGETS.join(", ")
                    ),
                );
            }
        }
    }

    fn validate_optim(&self, e: &mut Errors<'_>) {
        let o = &self.optim;
        e.check(
            o.lr.is_finite() && o.lr > 0.0,
            "optim.lr",
            format!("{} must be positive", o.lr),
        );
        for (i, b) in o.betas.iter().enumerate() {
            e.check(
                (0.0..1.0).contains(b),
                format!("optim.betas[{i}]"),
                format!("{b} must be in [0, 1)"),
            );
        }
        e.check(o.eps > 0.0, "optim.eps", "must be positive");
        e.check(
            o.weight_decay >= 0.0,
            "optim.weight_decay",
            "must not be negative",
        );
        let s = &self.schedule;
        e.check(
            s.min_lr >= 0.0 && s.min_lr <= o.lr,
            "schedule.min_lr",
            format!("{} must be between 0 and optim.lr {}", s.min_lr, o.lr),
        );
        let total = self.total_steps();
        // Phases given in epochs have no step count until the data is read.
        e.check(
            s.warmup_steps <= total || self.phases.iter().any(|p| p.epochs.is_some()),
            "schedule.warmup_steps",
            format!("{} exceeds the {total} total steps", s.warmup_steps),
        );
        let t = &self.train;
        e.check(t.grad_accum > 0, "train.grad_accum", "must be at least 1");
        if let Some(c) = t.clip_norm {
            e.check(
                c.is_finite() && c > 0.0,
                "train.clip_norm",
                format!("{c} must be positive"),
            );
        }
        e.check(
            t.checkpoint_every > 0,
            "train.checkpoint_every",
            "must be at least 1",
        );
        e.check(
            t.keep_checkpoints > 0,
            "train.keep_checkpoints",
            "must be at least 1",
        );
        e.check(t.eval_tokens > 0, "train.eval_tokens", "must be at least 1");
        if t.convergence_window > 0 {
            e.check(
                t.eval_every > 0 && t.convergence_window >= t.eval_every,
                "train.convergence_window",
                format!(
                    "{} needs `train.eval_every` set to at most the window (it compares evaluations)",
                    t.convergence_window
                ),
            );
        }
        e.check(
            (0.0..1.0).contains(&t.convergence_min_improvement),
            "train.convergence_min_improvement",
            format!("{} must be in [0, 1)", t.convergence_min_improvement),
        );
        if let Some(n) = t.head_chunk_tokens {
            e.check(
                n > 0,
                "train.head_chunk_tokens",
                "must be at least 1 (leave it out to compute the head over a whole micro-batch)",
            );
        }
        e.check(
            t.neftune_alpha.is_finite() && t.neftune_alpha >= 0.0,
            "train.neftune_alpha",
            format!("{} must not be negative", t.neftune_alpha),
        );
    }
}
