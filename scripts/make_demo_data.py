"""Write fittune's built-in demo set, fittune/demo/ai_research_qa.jsonl (text written by the fittune project).

Each concept of AI research gets a short definition of our own and several question phrasings; each row has
a question, its answer, four choices (the answer plus three definitions from other topics) and a topic label.
Re-running this script reproduces the shipped file byte for byte.

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FACTS: dict[str, list[tuple[str, str]]] = {
    "optimization": [
        ("stochastic gradient descent", "updating weights with gradients computed on small random batches"),
        ("the Adam optimizer", "a method that adapts each parameter's step using running moment estimates"),
        ("learning rate warmup", "starting with a small step size and raising it over the first updates"),
        ("cosine learning rate decay", "lowering the step size along a half cosine curve until training ends"),
        ("gradient clipping", "rescaling gradients whose norm exceeds a threshold to avoid unstable jumps"),
        ("momentum", "adding a fraction of the previous update to smooth the descent direction"),
        ("weight decay", "shrinking weights toward zero at each step to limit their size"),
        ("gradient accumulation", "summing gradients over several micro batches before one optimizer step"),
        ("a loss landscape", "the surface traced by the training loss as the parameters change"),
        ("second order optimization", "using curvature information such as the Hessian to choose update steps"),
    ],
    "architectures": [
        ("the transformer", "a network built from self attention and feed forward blocks with residual paths"),
        ("self attention", "letting every token weigh every other token when building its representation"),
        ("a residual connection", "adding a block's input to its output so signals skip past the block"),
        ("layer normalization", "rescaling each token's features to zero mean and unit variance"),
        ("a convolutional network", "a model that slides shared filters over a grid such as an image"),
        ("a recurrent network", "a model that carries a hidden state from one time step to the next"),
        ("grouped query attention", "sharing each key and value head among several query heads"),
        ("rotary position embedding", "encoding token positions by rotating query and key vectors"),
        ("a mixture of experts", "routing each token to a few specialist feed forward blocks"),
        ("an encoder decoder model", "a design where one stack reads the input and another writes the output"),
    ],
    "regularization": [
        ("dropout", "randomly zeroing activations during training so units do not co adapt"),
        ("early stopping", "ending training when the validation score stops improving"),
        ("data augmentation", "creating altered copies of training examples to enlarge the data"),
        ("label smoothing", "training against targets that spread a little probability over wrong classes"),
        ("an L1 penalty", "adding the sum of absolute weights to the loss to encourage sparsity"),
        ("an L2 penalty", "adding the sum of squared weights to the loss to keep weights small"),
        ("overfitting", "fitting noise in the training data so accuracy on new data suffers"),
        ("underfitting", "a model too simple to capture the patterns even in its training data"),
        ("mixup", "training on blends of pairs of examples and of their labels"),
        ("stochastic depth", "skipping whole residual blocks at random while training deep networks"),
    ],
    "evaluation": [
        ("a held out test set", "examples kept away from training and used only to measure final quality"),
        ("cross validation", "rotating which fold of the data is held out and averaging the scores"),
        ("precision", "the share of predicted positives that are truly positive"),
        ("recall", "the share of true positives that the model manages to find"),
        ("the F1 score", "the harmonic mean of precision and recall"),
        ("perplexity", "the exponential of the average negative log likelihood per token"),
        ("a confusion matrix", "a table counting each pair of true class and predicted class"),
        ("data leakage", "information from the test data slipping into training and inflating scores"),
        ("a majority class baseline", "always predicting the most frequent label to set a floor for scores"),
        ("calibration", "how well predicted probabilities match the observed frequencies of outcomes"),
    ],
    "reinforcement learning": [
        ("a reward signal", "a scalar the environment returns to tell the agent how well it acted"),
        ("a policy", "the rule an agent follows to choose an action in each state"),
        ("a value function", "the expected future return from a state under a given policy"),
        ("Q learning", "learning the value of each state and action pair from observed transitions"),
        ("the exploration exploitation trade off", "balancing trying new actions against using known good ones"),
        ("a discount factor", "a number below one that weights near rewards above distant ones"),
        ("policy gradient methods", "raising the probability of actions in proportion to the return they earned"),
        ("reinforcement learning from human feedback", "tuning a model with a reward model trained on human preferences"),
        ("a Markov decision process", "states, actions, transitions and rewards where the future depends only on the present"),
        ("proximal policy optimization", "policy updates kept close to the old policy with a clipped objective"),
    ],
    "language models": [
        ("tokenization", "splitting raw text into units from a fixed vocabulary"),
        ("byte pair encoding", "building a vocabulary by repeatedly merging the most frequent symbol pairs"),
        ("next token prediction", "training a model to guess each token from the tokens before it"),
        ("instruction tuning", "fine tuning on prompts paired with desired responses to follow requests"),
        ("in context learning", "solving a new task from examples placed in the prompt without weight updates"),
        ("chain of thought prompting", "asking the model to write intermediate reasoning steps before answering"),
        ("a context window", "the maximum number of tokens a model can attend to at once"),
        ("greedy decoding", "always emitting the single most probable next token"),
        ("temperature sampling", "dividing logits by a constant to make sampling sharper or flatter"),
        ("retrieval augmented generation", "fetching relevant documents and adding them to the prompt before generating"),
    ],
    "efficiency": [
        ("mixed precision training", "running most math in 16 bit floats while keeping master weights in 32 bit"),
        ("gradient checkpointing", "storing fewer activations and recomputing them during the backward pass"),
        ("LoRA", "training small low rank matrices added to frozen weight matrices"),
        ("quantization", "storing weights with fewer bits such as eight or four per value"),
        ("knowledge distillation", "training a small student model to imitate a large teacher model"),
        ("pruning", "removing weights or neurons that contribute little to the output"),
        ("data parallelism", "copying the model on every device and splitting each batch among them"),
        ("ZeRO sharding", "splitting optimizer states, gradients and parameters across data parallel workers"),
        ("CPU offloading", "keeping tensors in host memory and moving them to the accelerator only when needed"),
        ("flash attention", "computing attention in tiles inside fast on chip memory to avoid large buffers"),
    ],
    "generative models": [
        ("a variational autoencoder", "an encoder and decoder trained with a reconstruction term and a latent prior penalty"),
        ("a generative adversarial network", "a generator and a discriminator trained against each other"),
        ("a diffusion model", "a network that learns to reverse a gradual noising process step by step"),
        ("mode collapse", "a generator producing only a few kinds of outputs instead of the full variety"),
        ("a latent space", "a compressed set of coordinates from which data can be generated"),
        ("an autoregressive model", "a model that generates a sequence one element at a time conditioned on the past"),
        ("a normalizing flow", "a chain of invertible maps that turns a simple density into a complex one"),
        ("classifier free guidance", "mixing conditional and unconditional predictions to strengthen the condition"),
        ("the evidence lower bound", "a tractable objective that bounds the log likelihood from below"),
        ("a text to image model", "a system that synthesizes pictures from a written description"),
    ],
}

TEMPLATES = [
    "What is {c}?",
    "In machine learning research, what does {c} refer to?",
    "Which description best fits {c}?",
    "A paper mentions {c}. What does it mean?",
    "Explain {c} in one sentence.",
]


def build(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    by_topic = {t: [d for _, d in facts] for t, facts in FACTS.items()}
    rows = []
    for topic, facts in FACTS.items():
        others = [d for t, ds in by_topic.items() if t != topic for d in ds]
        for concept, definition in facts:
            for template in TEMPLATES:
                choices = [definition] + rng.sample(others, 3)
                rng.shuffle(choices)
                rows.append({
                    "id": f"q{len(rows):04d}",
                    "question": template.format(c=concept),
                    "answer": definition,
                    "choices": choices,
                    "topic": topic,
                })
    return rows


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "fittune" / "demo" / "ai_research_qa.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = build()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")
