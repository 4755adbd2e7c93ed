"""`hrpo.generate` / `hrpo.LLM` from the package top level (hrpo/__init__.py's PEP 562
__getattr__): `import hrpo` stays light, and the first use loads hrpo.serve and generates on the
embedded model what the rollout engine generates for that prompt by itself."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import sys, hrpo
heavy = {"torch", "hrpo.serve", "fastapi", "uvicorn"} & set(sys.modules)
assert not heavy, f"import hrpo pulled {heavy}"
assert {"generate", "LLM"} <= set(dir(hrpo))
try:
    hrpo.nonexistent
except AttributeError as err:
    assert "nonexistent" in str(err)
else:
    raise AssertionError("an unknown attribute did not raise")
text = hrpo.generate(["What is 2 + 3?"], max_tokens=8)[0]
assert "fastapi" not in sys.modules and "uvicorn" not in sys.modules, "hrpo.generate pulled the HTTP stack"
llm = hrpo.LLM(max_batch=2)
assert type(llm).__module__ == "hrpo.serve.llm"
from hrpo.engine.rollout import SamplingConfig
prompt = llm.chat_prompt([{"role": "user", "content": "What is 2 + 3?"}])
cfg = SamplingConfig(8, llm.temperature, llm.top_k, greedy=True, hybrid=llm.hybrid, latent=llm.latent)
out = llm.scheduler.engine.generate([prompt], cfg, seed=0)
alone = out.completion_ids[0][out.completion_mask[0]].tolist()
print(repr(text), repr(llm.decode(alone)))
assert text == llm.decode(alone) and text.strip()
"""


def test_top_level_generate_is_lazy_and_equals_the_engine_alone():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HRPO_GPU_PATH", None)
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-3000:]
