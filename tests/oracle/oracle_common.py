"""What the comparisons on the default model share: the prompts, the near-tie margin, and the
JSON report that docs/perf.md figures are read from."""
import json
import os

# A prediction whose top-1 beats its top-2 by at least this many logits is "decisive": two
# correct implementations with int8 activation rounding must agree there (see test_model_oracle).
DECISIVE_MARGIN = 0.5

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is 15 plus 27?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colours are",
    "Water boils at 100 degrees Celsius because",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "import numpy as np\nx = np.arange(10)\n",
    "The most important rule of writing clearly is",
    "1, 2, 3, 5, 8, 13,",
]


def report(env_var, key, value):
    """Merges {key: value} into the JSON file named by $env_var (nothing if it is unset)."""
    path = os.environ.get(env_var)
    if not path:
        return
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
