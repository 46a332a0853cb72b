//! Progress on stderr: an indicatif bar per phase on a terminal, one fixed-format line per
//! step otherwise (logs, CI).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use kiln_train::{Event, Observer};

/// Prints training events to stderr.
pub struct Progress {
    bar: Option<ProgressBar>,
    interactive: bool,
    color: bool,
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise; no color when `NO_COLOR` is set.
    pub fn new() -> Self {
        let interactive = std::io::stderr().is_terminal();
        let color = interactive && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Self {
            bar: None,
            interactive,
            color,
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// Finishes the current bar, leaving it on screen.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

impl Observer for Progress {
    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Info(msg) => self.line(&format!("{} {msg}", self.paint("36", "info:"))),
            Event::Warn(msg) => self.line(&format!("{} {msg}", self.paint("33", "warning:"))),
            Event::PhaseStart {
                index,
                name,
                first_step,
                last_step,
                phase_steps,
                total_steps,
            } => {
                self.finish();
                self.line(&format!(
                    "phase {index} `{name}`: steps {first_step}..={last_step} of {total_steps}"
                ));
                if self.interactive {
                    let bar = ProgressBar::with_draw_target(
                        Some(phase_steps),
                        ProgressDrawTarget::stderr(),
                    );
                    let template = if self.color {
                        "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}"
                    } else {
                        "{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}"
                    };
                    bar.set_style(
                        ProgressStyle::with_template(template)
                            .expect("valid template")
                            .progress_chars("=> "),
                    );
                    bar.set_prefix(name.to_string());
                    bar.set_position(phase_steps - (last_step + 1 - first_step));
                    bar.enable_steady_tick(Duration::from_millis(250));
                    self.bar = Some(bar);
                }
            }
            Event::Step(m) => {
                if let Some(bar) = &self.bar {
                    bar.inc(1);
                    bar.set_message(format!(
                        "loss {:.4} lr {:.2e} {:.0} tok/s",
                        m.loss, m.lr, m.tokens_per_s
                    ));
                } else {
                    eprintln!(
                        "step {:>6} | phase {} | loss {:.4} | lr {:.3e} | grad_norm {:.3} | tok/s {:.0} | gflop/s {:.1} | elapsed {:.1}s",
                        m.step,
                        m.phase,
                        m.loss,
                        m.lr,
                        m.grad_norm,
                        m.tokens_per_s,
                        m.gflops,
                        m.elapsed_s
                    );
                }
            }
            Event::Eval(e) => self.line(&format!(
                "{} step {} | eval_loss {:.4} | perplexity {:.2} | bits/byte {:.4} | {} tokens",
                self.paint("32", "eval:"),
                e.step,
                e.eval_loss,
                e.perplexity,
                e.bits_per_byte,
                e.eval_tokens
            )),
            Event::Checkpoint { step, path } => {
                self.line(&format!("checkpoint: step {step} -> {}", path.display()));
            }
            Event::PhaseEnd {
                index,
                name,
                counts,
            } => {
                self.finish();
                for (source, c) in counts {
                    self.line(&format!(
                        "phase {index} `{name}` done | source {source}: {} windows, {} tokens trained, {} dropped ({} trained spans cut), {} padding, {} overlap",
                        c.windows, c.trained, c.dropped, c.turns_cut, c.padded, c.overlap
                    ));
                }
            }
        }
    }
}
