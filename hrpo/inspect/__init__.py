"""Looking inside a hybrid policy: per generated position, the token, whether the row was
thinking, the gate coefficient and the tokens nearest to the latent h_hat; plus aggregates.

    python -m hrpo.inspect --checkpoint runs/arith/checkpoint --prompt "Tom has 3 apples ..."
    python -m hrpo.inspect --checkpoint ... --samples evals/run/samples.jsonl --limit 20 \\
        --html inspect.html --json inspect.json --png inspect.png

--prompt: greedy generation with hybrid latents on, through the rollout engine, as hrpo.eval
decodes (its system prompt rule, temperature 0.5 and top-k 50 for the distribution h_hat
mixes). --samples: each recorded completion is re-tokenized and teacher-forced through the
hybrid recurrence (the rollout loop with the recorded tokens in place of drawn ones), so the
latents and gates are those this model produces along that text, whatever decoding wrote it
(sampled, another checkpoint); the recorded fields (correct, gate_mean, completion_tokens)
are shown beside the replay. A completion decoded without its EOS replays without it, and a
text may re-tokenize differently from the ids that produced it.

What position t shows (hrpo/engine/rollout.py's step t): the token x_t drawn from p_t; T when the
row is still thinking after x_t (the marker not yet in the text); the gate coefficient
mean_channels(a_t), a_t = exp(-c softplus(-Lambda) sigmoid(W_r E[x_t] + b_r)), of the blend
a_t E[x_t] + sqrt(1 - a_t^2) (i_t h_hat_t) that is the input of step t + 1 (blank where the
input is plain E[x_t]: after the marker, or --no-hybrid); and the K tokens whose input
embeddings are nearest (cosine) to h_hat_t = p_t @ E / ||p_t||, the latent of the
distribution x_t was drawn from, as stored (bf16) and fed to the gate.

Aggregates: gate coefficients over blended positions, completion lengths, and the scripts
(hrpo.inspect.scripts) of the tokens nearest to thinking latents; the cross-lingual share is
the part of those written in letters that is in another script than the prompt's.
"""

from hrpo.inspect.report import aggregates, html_page
from hrpo.inspect.scripts import text_script
from hrpo.inspect.trace import Position, Trace, describe, nearest_tokens, replay, teacher_force

__all__ = [
    "Position",
    "Trace",
    "aggregates",
    "describe",
    "html_page",
    "nearest_tokens",
    "replay",
    "teacher_force",
    "text_script",
]
