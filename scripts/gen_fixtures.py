#!/usr/bin/env python3
"""Reference-fixture generator for `engine` (run from the repository root).

    python scripts/gen_fixtures.py                   # regenerate everything below
    python scripts/gen_fixtures.py --check-nf4-cuda  # compare nf4.safetensors with bitsandbytes on CUDA
    python scripts/gen_fixtures.py --check-engine-adapter ADAPTER_DIR --model MODEL_DIR [--quant nf4]
                                   [--ids-json FILE]  # PEFT loads an engine-written adapter: probs per row

Everything is deterministic (fixed seeds, single-threaded torch and tokenizers) and the script
is idempotent: a second run rewrites byte-identical files on the same machine.  Versions are in
scripts/requirements-fixtures.txt (a CPU build of torch is fine).

What it writes and why
----------------------
assets/demo/train.csv
    ~60 synthetic rows in the Kaggle LMSYS-arena train format, written by this script (no real
    arena data).  Single and multi-turn conversations, `null` turns, CJK, emoji, quotes, commas,
    newlines and two cells with an escaped lone surrogate (`\\ud83d`).  The label has a learnable
    signal: the clearly longer / more detailed answer usually wins, two short answers of similar
    length usually tie.  Used by `engine demo` and the training tests.
assets/tiny/tokenizer.json
    Byte-level BPE (vocab exactly 1024) trained on train.csv's text plus a built-in paragraph;
    `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3; post-processor prepends `<bos>`.
tests/fixtures/
    gemma2_f32/            Gemma2ForSequenceClassification, f32, one file, CLASSIC config keys.
    gemma2_bf16_sharded/   Gemma2ForCausalLM (tied), bf16, 3 shards + index, NEW config keys
                           (`rope_parameters`, non-default `layer_types`).
    llama_f32/             LlamaForSequenceClassification, f32, CLASSIC keys (`rope_theta`,
                           `rope_scaling` llama3, eos_token_id list).
    llama_bf16/            LlamaForCausalLM (untied lm_head present), bf16, NEW keys.
    gemma2_adapter/        PEFT LoRA (SEQ_CLS) for gemma2_bf16_sharded, written by PEFT itself.
    llama_adapter/         PEFT LoRA (SEQ_CLS, rsLoRA) for llama_bf16, written by PEFT itself.
    cases.json             6 test rows (raw CSV cells) and, per case, the token ids, logits and
                           probabilities of the Hugging Face reference (eager attention, f32).
    nf4.safetensors        bitsandbytes NF4 ground truth (packed nibbles, absmax, dequant, and
                           the double-quantised statistics) for several shapes and dtypes.
    train_parity.json      Training parity (section 8): for gemma2_lora (gemma2_f32, LoRA on all 7
                           projections, 3 AdamW steps, linear warmup, clipping active) and
                           llama_qlora (llama_f32 with NF4 projections, rsLoRA q/v, 2 steps,
                           cosine, label smoothing): the rows (ids + label triples, 2 soft), the
                           hyperparameters, per step lr / loss / micro-batch losses / pre-clip
                           gradient norm, the per-tensor update norms, the final probabilities,
                           and for gemma2_lora the first micro-batch's loss and gradient.
    train_gemma2_init/, train_llama_init/     the fixed initial PEFT adapters (B not zero),
    train_gemma2_final/, train_llama_final/   the adapters after training, by PEFT save_pretrained.

All tiny models are randomly initialised with large weights (std 0.2, random RMSNorm weights)
so that every feature the engine must reproduce visibly changes the output: attention logit
soft-capping, sliding windows, GQA, query_pre_attn_scalar != head_dim, llama3 RoPE scaling.
The summary at the end prints how much each one moves the logits.

bitsandbytes NF4: what the installed CPU path computes (read from bitsandbytes 0.50.2:
functional.py, backends/default/ops.py, backends/cpu/ops.py, csrc/cpu_ops.cpp) and how it
compares with the CUDA kernels (csrc/kernels.cu: kQuantizeBlockwise, kQuantizeBlockwiseSmall,
dQuantizeNF4, dQuantize, kDequantizeBlockwise).  Facts marked [checked] are asserted below.
----------------------------------------------------------------------------------------------
* quantize_4bit has no native CPU kernel: it runs the torch "default" backend.  The tensor is
  flattened row-major and cut into blocks of 64 (the last one may be partial); absmax[b] =
  max |x| over the block in f32 (bf16/f16 upcast exactly first) [checked].
* Scaling: full blocks multiply by the f32 RECIPROCAL, x * (1/absmax) (absmax clamped to
  >= 1e-38 for the reciprocal only; the stored absmax stays the true value, 0 for a zero block).
  The last, partial block uses a true DIVISION x / absmax.  CUDA always multiplies by
  1.0f/absmax.  The two can differ by 1 ulp, which matters only if the quotient sits exactly on
  a code midpoint.
* Code choice: clamp to [-1, 1], then `bucketize` against the 15 f32 midpoints
  (code[i]+code[i+1])/2: the nearest code, a value exactly ON a midpoint going to the LOWER
  code.  CUDA's dQuantizeNF4 is a tree of `x > threshold` tests whose 15 thresholds are
  bit-identical to those f32 midpoints [checked], so the tie rule is the same (t1 has a block
  whose values sit exactly on the midpoints).
* Packing: element 2k -> HIGH nibble, element 2k+1 -> LOW nibble of byte k, on both paths
  (CPU `(q[0::2] << 4) | q[1::2]`; CUDA `dQuantizeNF4(v[2j]) << 4 | dQuantizeNF4(v[2j+1])`)
  [checked].  Shape [(numel+1)//2, 1]; an odd numel pads with 0.0 -> nibble 7 in the last low
  nibble (CUDA loads the missing value as 0, also nibble 7).
* All-zero block: CPU stores absmax 0 and nibble 7 (code 0.0) everywhere -> bytes 0x77.  CUDA
  computes 1/0 = inf, 0*inf = NaN, and dQuantizeNF4(NaN) fails every `>` test -> nibble 0
  (code -1.0) -> bytes 0x00.  Both dequantise to zero (CUDA to -0.0).
* Dequantisation: out = code[nibble] * absmax[block] in f32, then cast to the output dtype
  (CUDA kDequantizeBlockwise; torch default backend).  bnb 0.50.2's CPU C++ kernel has an
  AVX-512 path (taken when the last dim is a multiple of 16) that indexes absmax per ROW as
  row*(cols/64) + col/64, which is wrong when a row is not a whole number of 64-blocks (e.g.
  96 or 80 wide: t3, t4, and the tiny models' o_proj [64,96] / down_proj [64,160]).  The
  fixtures therefore dequantise with their own code[nibble]*absmax (== the CUDA arithmetic),
  and the run prints whether bnb's CPU kernel agreed [checked].
* Double quantisation (compress_statistics=True): offset = mean(absmax) (f32 torch mean), then
  absmax - offset goes through quantize_blockwise(blocksize=256) with the signed 8-bit dynamic
  code (create_dynamic_map(): 256 sorted f32 values from -0.993 to 1.0, stored as
  code_dynamic).  Per 256-block: absmax2 = max |v|; u = v * (1/absmax2) (reciprocal on both
  paths).  Dequant: absmax = code_dynamic[q] * absmax2[block] + offset, two f32 ops [checked].
  - CPU (cpu_ops.cpp quantize_cpu_impl) does NOT search for the nearest code: u is clamped,
    mapped to one of 65536 grid points, i = uint16((u+1)*0.5*65535 + 0.5), and a table maps
    grid point i to the number of code midpoints below -1 + 2i/65535 (see _quantize_cpu_grid,
    which reproduces bnb bit-exactly [checked]).  A zero 256-block writes code 0.
  - CUDA (kQuantizeBlockwise<General8bit> + dQuantize<0>): 7-step binary search from pivot 127,
    then a midpoint test against the bracketing codes: the exact nearest code (ties toward the
    search pivot); emulated by _dquantize_cuda_rule.
  They disagree whenever u lies within about half a grid step (1.5e-5) of a code midpoint --
  anywhere in [-1, 1], not only near 0: 3 of t5's 1407 codes, and 2-4 codes per double-quant
  tiny model.  One code step is up to ~1.4% of absmax2 (0.9/64 near |u| = 1), enough to move the llama adapter case's
  probabilities by 4.6e-4.  Hence cases.json gives, for double-quant cases, both the CPU-rule
  reference (probs/logits) and the CUDA-rule one (probs_cuda_nested/logits_cuda_nested), and
  nf4.safetensors has tI.cuda.* keys.  `--check-nf4-cuda` verifies the CUDA emulation on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Determinism for the tokenizers trainer and for torch's CPU kernels: set before any import.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
DEMO_CSV = ROOT / "assets" / "demo" / "train.csv"
TOKENIZER_JSON = ROOT / "assets" / "tiny" / "tokenizer.json"
FIX = ROOT / "tests" / "fixtures"

LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0, 1, 2, 3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SURROGATE_MARK = "@@LONE_SURROGATE@@"  # replaced by the literal text \ud83d in a CSV cell


# ----------------------------------------------------------------------------------------------
# 1. Synthetic arena data (assets/demo/train.csv)
# ----------------------------------------------------------------------------------------------
# Every sentence below was written for this file.  A topic is a first-turn question, a few
# follow-up questions and a pool of sentences; an answer is a prefix of a shuffled pool, so a
# "long" answer is simply a more detailed one.

TOPICS = [
    {
        "q": "What is 2+2?",
        "follow": ["Are you sure? My friend says it's 5.", "And what is 2+2+2?"],
        "pool": [
            "2 + 2 equals 4.",
            "Adding two and two gives four, which is the basis of counting in pairs.",
            "You can check it by counting two apples, then two more, and counting the total.",
            "In binary the same sum is written 10 + 10 = 100.",
            "The famous \"2 + 2 = 5\" line comes from Orwell's novel 1984, where it shows how a regime can force people to accept nonsense.",
            "In ordinary arithmetic there is no context in which the answer is anything other than four.",
            "If you keep adding 2, you get the even numbers: 2, 4, 6, 8 and so on.",
        ],
    },
    {
        "q": "Explain how photosynthesis works.",
        "follow": ["Why are most plants green?", "Can you explain it for a ten-year-old?"],
        "pool": [
            "Photosynthesis is how plants turn light into chemical energy.",
            "Inside the chloroplasts, chlorophyll absorbs mostly red and blue light, which is why leaves look green.",
            "The light-dependent reactions split water, release oxygen and produce ATP and NADPH.",
            "The Calvin cycle then uses that ATP and NADPH to fix carbon dioxide into sugars such as glucose.",
            "The overall equation is 6 CO2 + 6 H2O + light -> C6H12O6 + 6 O2.",
            "Nearly all the oxygen in the atmosphere was produced this way over billions of years.",
            "Some plants, like corn and cacti, use C4 or CAM variants to save water in hot climates.",
        ],
    },
    {
        "q": "Write a haiku about autumn.",
        "follow": ["Now one about winter, please.", "Can you explain the syllable count?"],
        "pool": [
            "Crimson leaves drifting,\nthe old maple lets them go,\ncool wind hums softly.",
            "A haiku traditionally has three lines with five, seven and five syllables.",
            "Autumn poems often use a seasonal word, a kigo, such as 'harvest moon' or 'falling leaves'.",
            "Here is a second one:\nGeese write a long line\nacross the pale evening sky,\nthe fields smell of rain.",
            "I tried to keep the imagery concrete, because haiku work best when they show rather than tell.",
            "Feel free to ask for a version with a different mood, for example melancholic or playful.",
        ],
    },
    {
        "q": "How do I reverse a list in Python?",
        "follow": ["Which one is faster?", "What about reversing a string?"],
        "pool": [
            "Use slicing: `reversed_list = my_list[::-1]`.",
            "If you want to reverse in place, call `my_list.reverse()`, which returns None.",
            "The built-in `reversed(my_list)` gives you an iterator, so wrap it in `list(...)` if you need a list.",
            "Example:\n```python\nnums = [1, 2, 3]\nprint(nums[::-1])  # [3, 2, 1]\n```",
            "Slicing creates a copy, so it uses extra memory for large lists, while `.reverse()` does not.",
            "For strings the same slice works: `\"hello\"[::-1]` gives `\"olleh\"`.",
            "All three approaches run in linear time, O(n).",
        ],
    },
    {
        "q": "What are some tips for better sleep?",
        "follow": ["What if I work night shifts?", "Is melatonin safe?"],
        "pool": [
            "Go to bed and wake up at the same time every day, even on weekends.",
            "Keep your bedroom dark, quiet and cool, around 18 degrees Celsius.",
            "Avoid caffeine after about 2 p.m., since it can stay in your system for many hours.",
            "Put screens away 30 to 60 minutes before bed, or at least use a night mode.",
            "Regular exercise helps, but try not to do intense workouts right before sleeping.",
            "If you can't fall asleep after 20 minutes, get up, do something calm and return when you feel sleepy.",
            "Persistent insomnia is worth discussing with a doctor, because it can have medical causes.",
        ],
    },
    {
        "q": "Can you summarize the plot of Romeo and Juliet?",
        "follow": ["Who is to blame for the tragedy?", "What are the main themes?"],
        "pool": [
            "Two teenagers from feuding families in Verona fall in love and marry in secret.",
            "After Romeo kills Tybalt in a street fight, he is banished from the city.",
            "Juliet takes a potion from Friar Laurence that makes her appear dead, planning to escape with Romeo.",
            "The message explaining the plan never reaches Romeo, who believes she is really dead.",
            "He poisons himself at her tomb; she wakes, finds him dead and stabs herself.",
            "Their deaths finally reconcile the Montagues and the Capulets.",
            "The play explores fate, haste, and how hatred between adults destroys the young.",
        ],
    },
    {
        "q": "What's the difference between TCP and UDP?",
        "follow": ["Which one do video games use?", "Is HTTP/3 built on UDP?"],
        "pool": [
            "TCP is connection-oriented and guarantees ordered, reliable delivery; UDP does not.",
            "TCP uses handshakes, acknowledgements and retransmissions, which add latency.",
            "UDP just sends datagrams, so it is faster and simpler but packets can be lost or reordered.",
            "Web pages, email and file transfers typically use TCP.",
            "Live video, voice calls, DNS lookups and many online games prefer UDP.",
            "QUIC, the transport under HTTP/3, builds reliability on top of UDP in user space.",
            "TCP also has congestion control, which makes it a good citizen on shared networks.",
        ],
    },
    {
        "q": "Give me a recipe for pancakes.",
        "follow": ["Can I make them vegan?", "How do I keep them fluffy?"],
        "pool": [
            "Mix 1 cup flour, 1 tablespoon sugar, 2 teaspoons baking powder and a pinch of salt.",
            "Whisk in 1 cup milk, 1 egg and 2 tablespoons melted butter until just combined.",
            "A few lumps are fine; over-mixing makes pancakes tough.",
            "Heat a lightly oiled pan over medium heat and pour about 1/4 cup of batter per pancake.",
            "Flip when bubbles form on the surface and the edges look set, after roughly 2 minutes.",
            "Serve with maple syrup, berries, or lemon and sugar.",
            "For a vegan version, use plant milk, a flax egg and oil instead of butter.",
        ],
    },
    {
        "q": "Is it safe to eat raw cookie dough?",
        "follow": ["What about store-bought edible dough?"],
        "pool": [
            "It is not recommended.",
            "Raw eggs can carry Salmonella, and raw flour can carry E. coli.",
            "Heat-treating the flour to 75 degrees Celsius and skipping the eggs makes it much safer.",
            "Edible cookie dough sold in stores is made that way and is fine to eat as is.",
            "Children, pregnant people and the elderly should be especially careful.",
            "If you do taste a little dough, the risk is small but not zero.",
        ],
    },
    {
        "q": "Translate 'good morning' into Spanish, French and German.",
        "follow": ["And 'good night'?", "How do you say it in Italian?"],
        "pool": [
            "Spanish: \"Buenos días\". French: \"Bonjour\". German: \"Guten Morgen\".",
            "In Spanish you might also hear \"Buen día\" in parts of Latin America.",
            "French speakers use \"Bonjour\" all day; \"Bon matin\" is mostly heard in Quebec.",
            "In southern Germany and Austria people often say \"Servus\" or \"Grüß Gott\" instead.",
            "For 'good night' the phrases are \"Buenas noches\", \"Bonne nuit\" and \"Gute Nacht\".",
            "Italian is \"Buongiorno\" in the morning and \"Buonanotte\" at night.",
        ],
    },
    {
        "q": "Why is the sky blue?",
        "follow": ["Then why are sunsets red?", "Is the sky blue on Mars too?"],
        "pool": [
            "Because of Rayleigh scattering.",
            "Air molecules scatter short wavelengths of sunlight much more strongly than long ones, roughly as 1/λ⁴.",
            "Blue light is scattered all over the sky, so it reaches your eyes from every direction.",
            "Violet is scattered even more, but the Sun emits less of it and our eyes are less sensitive to it.",
            "At sunset light travels through much more air, so most blue is scattered away and reds remain.",
            "On Mars fine dust scatters differently, giving a butterscotch sky and bluish sunsets.",
        ],
    },
    {
        "q": "Tell me a joke about programmers.",
        "follow": ["Another one, please!", "Explain why it's funny."],
        "pool": [
            "Why do programmers prefer dark mode? Because light attracts bugs. 🐛",
            "A SQL query walks into a bar, goes up to two tables and asks: \"Can I join you?\"",
            "There are 10 kinds of people: those who understand binary and those who don't.",
            "I'd tell you a UDP joke, but you might not get it. 😄",
            "The joke works because 'bugs' means both insects and software errors.",
            "Programmers also say that the hardest problems are naming things, cache invalidation and off-by-one errors.",
        ],
    },
    {
        "q": "How many planets are in the solar system?",
        "follow": ["Why isn't Pluto a planet anymore?", "Which one is the largest?"],
        "pool": [
            "There are eight planets.",
            "In order from the Sun: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
            "Pluto was reclassified as a dwarf planet in 2006 by the International Astronomical Union.",
            "It was demoted because it has not cleared its orbital neighbourhood of other objects.",
            "Jupiter is the largest planet; more than 1,300 Earths would fit inside it.",
            "Other dwarf planets include Eris, Haumea, Makemake and Ceres.",
        ],
    },
    {
        "q": "What should I name my new puppy? 🐶",
        "follow": ["It's a girl and she's very fluffy.", "Something more unusual?"],
        "pool": [
            "How about Biscuit? 🍪",
            "Popular names include Luna, Max, Bella, Charlie, Daisy and Milo.",
            "Food names like Mochi, Pickles or Waffles are playful and easy to call out.",
            "A short name with one or two syllables is easier for a puppy to learn.",
            "For a fluffy girl: Cloud, Pearl, Willow or Nimbus could suit her.",
            "Try calling the name out loud a few times; if it feels natural, it's probably the one! 🐾",
        ],
    },
    {
        "q": "Explain recursion to a five-year-old.",
        "follow": ["Now explain it to a programmer.", "What is a base case?"],
        "pool": [
            "Recursion is when something is defined using a smaller copy of itself.",
            "Imagine a set of nesting dolls: to find the smallest doll, you open a doll and do the same thing again with the one inside.",
            "You stop when you reach a doll that does not open; that is called the base case.",
            "Without a base case you would keep opening forever, like a function that never returns.",
            "In code, factorial(n) = n * factorial(n - 1), with factorial(0) = 1 as the base case.",
            "Each call waits for the smaller call to finish, and the answers are combined on the way back.",
        ],
    },
    {
        "q": "What is the capital of Australia?",
        "follow": ["Why not Sydney?", "When was it founded?"],
        "pool": [
            "Canberra.",
            "The capital of Australia is Canberra, not Sydney or Melbourne as many people assume.",
            "Canberra was chosen in 1908 as a compromise between the two rival cities.",
            "It was a purpose-built city designed by the American architects Walter Burley Griffin and Marion Mahony Griffin.",
            "Parliament moved there in 1927, and the current Parliament House opened in 1988.",
            "Today it has about 470,000 inhabitants.",
        ],
    },
    {
        "q": "How do vaccines work?",
        "follow": ["Are mRNA vaccines different?", "What is herd immunity?"],
        "pool": [
            "Vaccines train your immune system to recognise a germ without making you sick.",
            "They contain a harmless piece or version of the pathogen, or instructions to make one.",
            "Your body responds by making antibodies and memory cells.",
            "If you meet the real germ later, the memory cells react quickly and strongly.",
            "mRNA vaccines deliver instructions for a single protein; the mRNA is broken down within days.",
            "When enough people are immune, outbreaks die out, which protects those who cannot be vaccinated.",
        ],
    },
    {
        "q": "Write a SQL query that counts users per country.",
        "follow": ["Only countries with more than 100 users.", "Sort it by the count."],
        "pool": [
            "SELECT country, COUNT(*) AS users FROM users GROUP BY country;",
            "If some rows have no country, use COALESCE(country, 'unknown') in both the SELECT and the GROUP BY.",
            "To keep only large countries, add HAVING COUNT(*) > 100 after the GROUP BY.",
            "Add ORDER BY users DESC to list the biggest countries first.",
            "Counting COUNT(DISTINCT user_id) avoids double counting if the table has duplicate rows.",
            "An index on the country column makes this query fast on large tables.",
        ],
    },
    {
        "q": "如何学习编程？",
        "follow": ["我应该先学哪种语言？", "每天要练习多久？"],
        "pool": [
            "先选一门语言，比如 Python。",
            "每天坚持写一点代码，比看很多教程更有效。",
            "从小项目开始，例如计算器、待办清单或者简单的网页。",
            "遇到错误时，先仔细阅读报错信息，再去搜索。",
            "学习数据结构和算法可以帮助你写出更高效的程序。",
            "加入开源项目或者学习小组，可以得到别人的反馈。",
        ],
    },
    {
        "q": "日本でおすすめの観光地はどこですか？",
        "follow": ["秋に行くならどこがいいですか？"],
        "pool": [
            "京都がおすすめです。",
            "京都には清水寺や伏見稲荷大社など、歴史的なお寺や神社がたくさんあります。",
            "東京では浅草や渋谷、新宿など、伝統と現代の両方を楽しめます。",
            "北海道は冬の雪まつりと新鮮な海鮮料理で有名です。",
            "秋は紅葉の季節なので、京都や日光が特にきれいです。",
            "移動には JR パスを使うと便利でお得です。",
        ],
    },
    {
        "q": "김치찌개 만드는 법 알려줘",
        "follow": ["돼지고기 대신 참치를 넣어도 돼?"],
        "pool": [
            "잘 익은 김치와 돼지고기를 준비하세요.",
            "냄비에 기름을 두르고 돼지고기와 김치를 함께 볶아 주세요.",
            "물이나 멸치 육수를 붓고 고춧가루와 다진 마늘을 넣어 끓입니다.",
            "두부와 대파를 넣고 5분 정도 더 끓이면 완성입니다.",
            "참치 통조림을 넣어도 맛있는 참치 김치찌개가 됩니다.",
        ],
    },
]

OPENERS = ["", "", "", "Sure! ", "Great question. ", "Here's a quick answer: ", "Of course. ",
           "Happy to help 🙂 ", "Good question! "]
MODELS = ["gpt-4-1106-preview", "gpt-4-0613", "gpt-3.5-turbo-0613", "claude-2.1", "claude-instant-1",
          "llama-2-70b-chat", "llama-2-13b-chat", "mixtral-8x7b-instruct-v0.1", "mistral-medium",
          "gemini-pro", "vicuna-13b", "zephyr-7b-beta", "openchat-3.5", "qwen-14b-chat", "yi-34b-chat"]


def length_units(turns):
    """Rough answer length: whitespace words plus half the CJK characters."""
    n = 0
    for t in turns:
        if t is None:
            continue
        n += len(t.split())
        n += sum(1 for ch in t if "\u3040" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7a3") // 2
    return n


def make_answer(rng, pool, k):
    """A k-sentence answer drawn from a topic pool (first sentence kept first half the time)."""
    idx = list(range(1, len(pool)))
    rng.shuffle(idx)
    order = ([0] if rng.random() < 0.5 else []) + idx
    order = order[: max(1, min(k, len(pool)))]
    sep = "\n" if rng.random() < 0.25 else " "
    text = rng.choice(OPENERS) + sep.join(pool[i] for i in order)
    words = text.split(" ")
    if len(words) > 140:  # keep responses within 10..150 words
        text = " ".join(words[:140]) + "..."
    return text


def fit_length(rng, turns, pool):
    """Keep a whole answer (all turns together) between 10 and 150 length units."""
    turns = list(turns)
    while length_units(turns) < 10:
        turns[-1] = turns[-1] + " " + rng.choice(pool[1:])
    while length_units(turns) > 150:
        words = turns[-1].split(" ")
        turns[-1] = " ".join(words[: max(3, len(words) - 10)]) + "..."
    return turns


def cell(turns, raw_newlines=False):
    """A CSV cell as in the Kaggle file: a JSON list, non-ASCII kept raw; the marker becomes
    the escaped lone surrogate \\ud83d.  raw_newlines puts a real newline between the list
    items (valid JSON whitespace) so the CSV field itself spans lines."""
    s = json.dumps(turns, ensure_ascii=False, separators=(",\n ", ": ") if raw_newlines else None)
    return s.replace(SURROGATE_MARK, "\\ud83d")


def make_train_rows(n_rows=60, seed=1234):
    import random

    rng = random.Random(seed)
    rows = []
    used_ids = set()
    for r in range(n_rows):
        topic = TOPICS[r % len(TOPICS)] if r < len(TOPICS) else rng.choice(TOPICS)
        n_turns = 1
        if r % 4 == 1:
            n_turns = 2
        elif r % 9 == 3:
            n_turns = 3
        prompts = [topic["q"]] + [topic["follow"][i % len(topic["follow"])] for i in range(n_turns - 1)]
        # decide which side is detailed: 'ls' = a long, b short, etc.
        mode = rng.choice(["ls", "sl", "ss", "ll", "ms", "sm", "ls", "sl"])
        size = {"l": (4, 7), "m": (2, 3), "s": (1, 1)}
        ra, rb = [], []
        for _ in range(n_turns):
            ka = rng.randint(*size[mode[0]]) if n_turns == 1 else max(1, rng.randint(*size[mode[0]]) // n_turns + (mode[0] == "l"))
            kb = rng.randint(*size[mode[1]]) if n_turns == 1 else max(1, rng.randint(*size[mode[1]]) // n_turns + (mode[1] == "l"))
            ra.append(make_answer(rng, topic["pool"], ka))
            rb.append(make_answer(rng, topic["pool"], kb))
        ra, rb = fit_length(rng, ra, topic["pool"]), fit_length(rng, rb, topic["pool"])
        # special rows: null turns, refusals, escaped lone surrogates
        if r == 7:
            rb = [None] * n_turns  # model b produced nothing
        if r == 13:
            prompts = ["hi", None]
            ra = ["Hello! How can I help you today?", None]
            rb = ["Hi there 👋 What would you like to talk about? I can help with writing, coding, "
                  "math, travel plans and much more.", None]
        if r == 22:
            ra = ["I'm sorry, but I can't help with that request. Is there anything else I can do for you?"]
        if r in (17, 41):
            ra[-1] = ra[-1] + " " + SURROGATE_MARK  # an emoji cut in half, as in the real data
        la, lb = length_units(ra), length_units(rb)
        diff = la - lb
        u = rng.random()
        if max(la, lb) < 35 and abs(diff) <= 10:
            label = 2 if u < 0.7 else (0 if u < 0.85 else 1)
        elif abs(diff) <= 10:
            label = 2 if u < 0.4 else (0 if u < 0.7 else 1)
        else:
            longer, shorter = (0, 1) if diff > 0 else (1, 0)
            label = longer if u < 0.8 else (2 if u < 0.9 else shorter)
        while True:
            rid = rng.randrange(30_000, 4_294_967_295)
            if rid not in used_ids:
                used_ids.add(rid)
                break
        ma, mb = rng.sample(MODELS, 2)
        rows.append({
            "id": rid, "model_a": ma, "model_b": mb,
            "prompt": cell(prompts), "response_a": cell(ra, raw_newlines=r in (5, 30)), "response_b": cell(rb),
            "winner_model_a": int(label == 0), "winner_model_b": int(label == 1), "winner_tie": int(label == 2),
        })
    return rows


def write_train_csv(rows):
    import csv
    import io

    cols = ["id", "model_a", "model_b", "prompt", "response_a", "response_b"] + LABELS
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writeheader()
    for row in rows:
        w.writerow(row)
    DEMO_CSV.parent.mkdir(parents=True, exist_ok=True)
    DEMO_CSV.write_text(buf.getvalue(), encoding="utf-8")
    counts = [sum(r[k] for r in rows) for k in LABELS]
    print(f"[csv] {DEMO_CSV.relative_to(ROOT)}: {len(rows)} rows, labels a/b/tie = {counts}")


# ----------------------------------------------------------------------------------------------
# 2. Text rule (DESIGN.md §5 `concat`) shared by the tokenizer corpus and the cases
# ----------------------------------------------------------------------------------------------

def cell_turns(raw):
    """Decode a CSV cell: JSON list -> list of str; null -> ""; lone surrogates -> U+FFFD."""
    turns = json.loads(raw)
    out = []
    for t in turns:
        if t is None:
            t = ""
        out.append("".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in t))
    return out


def concat_text(prompt, response_a, response_b):
    p, a, b = (" ".join(cell_turns(c)) for c in (prompt, response_a, response_b))
    return "<prompt>: " + p + "\n\n<response_a>: " + a + "\n\n<response_b>: " + b


def encode_concat(tok, row, max_length, eos_id):
    """ids = encode(text, add_special_tokens=True)[: max_length-1] + [eos]."""
    ids = tok.encode(concat_text(row["prompt"], row["response_a"], row["response_b"]),
                     add_special_tokens=True)
    return ids[: max_length - 1] + [eos_id]


# ----------------------------------------------------------------------------------------------
# 3. Tokenizer (assets/tiny/tokenizer.json)
# ----------------------------------------------------------------------------------------------

EXTRA_PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog, while a curious robot counts the clouds. "
    "Numbers like 3.14159, 2024 and 1,000,000 appear in answers; so do questions, lists and code. "
    "我们今天学习机器学习和自然语言处理。模型需要理解问题并给出有用的回答。"
    "東京と大阪を新幹線で移動します。ありがとうございました。"
    "안녕하세요, 오늘 날씨가 정말 좋네요. "
    "Emoji appear too: 😀 👍 🎉 🐶 🍕 🚀 ❤️ — and punctuation such as « », “ ”, ‘ ’, … and ½."
)


def train_tokenizer(rows):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [concat_text(r["prompt"], r["response_a"], r["response_b"]) for r in rows]
    corpus += [EXTRA_PARAGRAPH] * 3
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)],
    )
    assert tok.get_vocab_size() == 1024, tok.get_vocab_size()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    TOKENIZER_JSON.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(TOKENIZER_JSON), pretty=False)

    # transformers reads it and prepends <bos> by default
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_JSON))
    sample = "Hello 世界 😀 \ufffd"
    ids = hf.encode(sample)
    assert ids[0] == 2 and ids[1:] == tok.encode(sample, add_special_tokens=False).ids, ids
    assert hf.decode(ids[1:]) == sample
    print(f"[tok] {TOKENIZER_JSON.relative_to(ROOT)}: vocab {tok.get_vocab_size()}, "
          f"'{sample}' -> {ids}")
    return hf


# ----------------------------------------------------------------------------------------------
# 4. Tiny random models (tests/fixtures/<model>/)
# ----------------------------------------------------------------------------------------------

ID2LABEL = {0: "winner_model_a", 1: "winner_model_b", 2: "winner_tie"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}

GEMMA2_DIMS = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=32,
    sliding_window=16, attn_logit_softcapping=3.0, final_logit_softcapping=30.0,
    rms_norm_eps=1e-6, max_position_embeddings=512, hidden_activation="gelu_pytorch_tanh",
    pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.2,
)
GEMMA2_ROPE_THETA = 10000.0
LLAMA_DIMS = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
    max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=[1, 3],
    initializer_range=0.2, attention_bias=False, mlp_bias=False, hidden_act="silu",
)
LLAMA_ROPE_THETA = 500000.0
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def randomize_(model, seed, std=0.2, norm="gemma"):
    """Overwrite every parameter with seeded noise.  Norm weights get N(0, 0.3) for Gemma
    (used as 1+w) and 1+N(0, 0.3) for Llama, so they matter but stay positive-ish."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied weights appear once
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                v = noise * 0.3 + (0.0 if norm == "gemma" else 1.0)
            else:
                v = noise * std
            p.copy_(v.to(p.dtype))


def classic_gemma2_config(arch):
    """config.json as the hub's gemma-2 checkpoints write it (transformers 4.4x era)."""
    d = GEMMA2_DIMS
    cfg = {
        "architectures": [arch],
        "model_type": "gemma2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": d["attn_logit_softcapping"],
        "bos_token_id": d["bos_token_id"],
        "cache_implementation": "hybrid",
        "eos_token_id": d["eos_token_id"],
        "final_logit_softcapping": d["final_logit_softcapping"],
        "head_dim": d["head_dim"],
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": d["hidden_activation"],
        "hidden_size": d["hidden_size"],
        "initializer_range": d["initializer_range"],
        "intermediate_size": d["intermediate_size"],
        "max_position_embeddings": d["max_position_embeddings"],
        "num_attention_heads": d["num_attention_heads"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_key_value_heads": d["num_key_value_heads"],
        "pad_token_id": d["pad_token_id"],
        "query_pre_attn_scalar": d["query_pre_attn_scalar"],
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_theta": GEMMA2_ROPE_THETA,
        "sliding_window": d["sliding_window"],
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": d["vocab_size"],
    }
    if arch.endswith("SequenceClassification"):
        cfg["id2label"] = {str(k): v for k, v in ID2LABEL.items()}
        cfg["label2id"] = LABEL2ID
    return dict(sorted(cfg.items()))


def classic_llama_config(arch):
    """config.json as the hub's Llama-3.1 checkpoints write it (rope_scaling + rope_theta)."""
    d = LLAMA_DIMS
    cfg = {
        "architectures": [arch],
        "model_type": "llama",
        "attention_bias": d["attention_bias"],
        "attention_dropout": 0.0,
        "bos_token_id": d["bos_token_id"],
        "eos_token_id": d["eos_token_id"],
        "head_dim": d["head_dim"],
        "hidden_act": d["hidden_act"],
        "hidden_size": d["hidden_size"],
        "initializer_range": d["initializer_range"],
        "intermediate_size": d["intermediate_size"],
        "max_position_embeddings": d["max_position_embeddings"],
        "mlp_bias": d["mlp_bias"],
        "num_attention_heads": d["num_attention_heads"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_key_value_heads": d["num_key_value_heads"],
        "pad_token_id": d["pad_token_id"],
        "pretraining_tp": 1,
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_scaling": dict(LLAMA3_SCALING),
        "rope_theta": LLAMA_ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": d["vocab_size"],
    }
    if arch.endswith("SequenceClassification"):
        cfg["id2label"] = {str(k): v for k, v in ID2LABEL.items()}
        cfg["label2id"] = LABEL2ID
    return dict(sorted(cfg.items()))


def _fresh_dir(path):
    import shutil

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _finish_model_dir(model, out, config_override=None, **save_kw):
    import shutil

    _fresh_dir(out)
    model.save_pretrained(out, **save_kw)
    if config_override is not None:
        (out / "config.json").write_text(json.dumps(config_override, indent=2) + "\n")
    shutil.copyfile(TOKENIZER_JSON, out / "tokenizer.json")
    (out / "generation_config.json").unlink(missing_ok=True)


def _round_to_bf16_(model):
    """Round the f32 parameters to bf16 values in place (dtype stays f32)."""
    torch = _torch()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def _save_bf16(model, out, **save_kw):
    """Save a bf16 copy; the f32 model (already rounded) stays the reference for the check.
    (Casting the module itself would also round RoPE's inv_freq buffer.)"""
    import copy

    torch = _torch()
    _finish_model_dir(copy.deepcopy(model).to(torch.bfloat16), out, **save_kw)


def _check_reload(model, out, cls):
    """Reloading through transformers must give the in-memory f32 model's outputs exactly."""
    torch = _torch()
    ids = torch.tensor([[2] + list(range(10, 60)) + [1]])
    ref = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        a = model.eval()(ids).logits
        b = ref(ids).logits
    assert torch.equal(a, b), (out, (a - b).abs().max())
    return ref


def gen_gemma2_f32():
    torch = _torch()
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    cfg = Gemma2Config(**GEMMA2_DIMS, rope_theta=GEMMA2_ROPE_THETA, num_labels=3,
                       id2label=ID2LABEL, label2id=LABEL2ID)
    torch.manual_seed(11)
    model = Gemma2ForSequenceClassification._from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, seed=101)
    out = FIX / "gemma2_f32"
    _finish_model_dir(model, out, classic_gemma2_config("Gemma2ForSequenceClassification"))
    ref = _check_reload(model, out, Gemma2ForSequenceClassification)
    assert ref.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert ref.config.rope_parameters["rope_theta"] == GEMMA2_ROPE_THETA
    assert ref.config.sliding_window == 16 and ref.config.query_pre_attn_scalar == 32
    print(f"[model] gemma2_f32: classic config reloads; layer_types {ref.config.layer_types}")


def gen_gemma2_bf16_sharded():
    torch = _torch()
    from transformers import Gemma2Config, Gemma2ForCausalLM

    layer_types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    cfg = Gemma2Config(**GEMMA2_DIMS, rope_theta=GEMMA2_ROPE_THETA, layer_types=layer_types,
                       tie_word_embeddings=True)
    torch.manual_seed(12)
    model = Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, seed=202)
    _round_to_bf16_(model)
    out = FIX / "gemma2_bf16_sharded"
    _save_bf16(model, out, max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").exists(), shards
    written = json.loads((out / "config.json").read_text())
    assert written["layer_types"] == layer_types and "rope_parameters" in written, written
    ref = _check_reload(model, out, Gemma2ForCausalLM)
    assert ref.config.layer_types == layer_types
    print(f"[model] gemma2_bf16_sharded: {len(shards)} shards, layer_types {layer_types}")


def gen_llama_f32():
    torch = _torch()
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(**LLAMA_DIMS, rope_theta=LLAMA_ROPE_THETA, rope_scaling=dict(LLAMA3_SCALING),
                      num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID, tie_word_embeddings=False)
    torch.manual_seed(13)
    model = LlamaForSequenceClassification._from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, seed=303, norm="llama")
    out = FIX / "llama_f32"
    _finish_model_dir(model, out, classic_llama_config("LlamaForSequenceClassification"))
    ref = _check_reload(model, out, LlamaForSequenceClassification)
    rp = ref.config.rope_parameters
    assert rp["rope_type"] == "llama3" and rp["rope_theta"] == LLAMA_ROPE_THETA, rp
    assert rp["original_max_position_embeddings"] == 64 and rp["factor"] == 8.0, rp
    print(f"[model] llama_f32: classic config reloads; rope_parameters {rp}")


def gen_llama_bf16():
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA_DIMS, rope_theta=LLAMA_ROPE_THETA, rope_scaling=dict(LLAMA3_SCALING),
                      tie_word_embeddings=False)
    torch.manual_seed(14)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, seed=404, norm="llama")
    _round_to_bf16_(model)
    out = FIX / "llama_bf16"
    _save_bf16(model, out)
    written = json.loads((out / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written and "rope_theta" not in written, written
    _check_reload(model, out, LlamaForCausalLM)
    print(f"[model] llama_bf16: new-style config, rope_parameters {written['rope_parameters']}")


# ----------------------------------------------------------------------------------------------
# 5. PEFT adapters (tests/fixtures/<adapter>/), written by PEFT's own save_pretrained
# ----------------------------------------------------------------------------------------------
# Key names PEFT 0.21.2 wrote (printed by the run; keep in sync with the loader):
#   base_model.model.model.layers.{L}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in]
#   base_model.model.model.layers.{L}.self_attn.{q,k,v,o}_proj.lora_B.weight   [out, r]
#   base_model.model.model.layers.{L}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
#   base_model.model.score.weight                                              [3, hidden]
# i.e. no adapter name in the keys, and the modules_to_save copy of `score` saved under the
# plain module path.  adapter_config.json: task_type "SEQ_CLS", modules_to_save
# ["classifier", "score"], target_modules (a set, written as a list in arbitrary order --
# sorted here for stable output), layers_to_transform, r, lora_alpha, use_rslora, ...

ADAPTERS = {
    "gemma2_adapter": dict(base="gemma2_bf16_sharded", seed=505, r=4, lora_alpha=8, use_rslora=False,
                           target_modules=list(PROJECTIONS), layers_to_transform=[1, 2, 3]),
    "llama_adapter": dict(base="llama_bf16", seed=606, r=8, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2]),
}


def load_seq_cls(model_dir, seed=0):
    """AutoModelForSequenceClassification in f32 / eager (a causal-LM dir gets a fresh head)."""
    torch = _torch()
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=3, dtype=torch.float32, attn_implementation="eager").eval()


def save_peft_adapter(model, name, base_name):
    """PEFT's own save_pretrained into tests/fixtures/<name>/, then: drop PEFT's README.md, sort
    the list-valued config entries, make base_model_name_or_path the fixture's dir name.
    Returns (sorted keys, {key: (dtype, shape)}, adapter_config)."""
    from safetensors import safe_open

    out = FIX / name
    _fresh_dir(out)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template, not ours
    acfg = json.loads((out / "adapter_config.json").read_text())
    for k in ("target_modules", "modules_to_save"):
        if isinstance(acfg.get(k), list):
            acfg[k] = sorted(acfg[k])
    acfg["base_model_name_or_path"] = base_name  # PEFT wrote an absolute local path
    (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        shapes = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in keys}
    assert "base_model.model.score.weight" in keys, keys
    return keys, shapes, acfg


def gen_adapter(name):
    torch = _torch()
    from peft import LoraConfig, TaskType, get_peft_model

    spec = ADAPTERS[name]
    base = load_seq_cls(FIX / spec["base"], seed=spec["seed"])
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=spec["r"], lora_alpha=spec["lora_alpha"],
                     use_rslora=spec["use_rslora"], lora_dropout=0.0,
                     target_modules=spec["target_modules"], layers_to_transform=spec["layers_to_transform"])
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(spec["seed"])
    n_lora = 0
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if "lora_A" in pname:  # kaiming-uniform-like range, seeded
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
                n_lora += 1
            elif "lora_B" in pname:  # non-zero, otherwise LoRA is a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                n_lora += 1
            elif "modules_to_save" in pname and "score" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    keys, shapes, acfg = save_peft_adapter(model, name, spec["base"])
    assert n_lora == len([k for k in keys if "lora_" in k]), (n_lora, keys)
    print(f"[adapter] {name}: {len(keys)} tensors, e.g.")
    for k in keys[:2] + [k for k in keys if "score" in k]:
        print(f"      {k} {shapes[k]}")
    print("      adapter_config: " + ", ".join(f"{k}={acfg[k]!r}" for k in (
        "task_type", "peft_type", "r", "lora_alpha", "use_rslora", "target_modules",
        "layers_to_transform", "modules_to_save", "base_model_name_or_path") if k in acfg))
    return keys


# ----------------------------------------------------------------------------------------------
# 6. Reference cases (tests/fixtures/cases.json)
# ----------------------------------------------------------------------------------------------
# Raw CSV cells (exactly the text between the CSV quotes, after CSV unquoting).

CASE_ROWS = [
    {   # short; a null answer
        "id": "1001",
        "prompt": '["Capital of Australia?"]',
        "response_a": "[null]",
        "response_b": '["Canberra."]',
    },
    {   # three turns, quotes and a newline escape inside the JSON strings
        "id": "1002",
        "prompt": '["Tell me a joke about programmers.", "Another one, please!", "Explain why it\'s funny."]',
        "response_a": '["A SQL query walks into a bar, goes up to two tables and asks: \\"Can I join you?\\"", '
                      '"There are 10 kinds of people: those who understand binary and those who don\'t.", '
                      '"It plays on the word \\"join\\",\\na database operation."]',
        "response_b": '["Why did the programmer quit? He didn\'t get arrays.", "No.", "Because it is."]',
    },
    {   # CJK
        "id": "1003",
        "prompt": '["如何学习编程？请给我一些建议。"]',
        "response_a": '["先选一门语言，比如 Python。每天坚持写一点代码，从小项目开始。遇到错误时，先阅读报错信息。"]',
        "response_b": '["京都がおすすめです。김치찌개도 맛있어요. Just practice every day!"]',
    },
    {   # emoji (including a ZWJ sequence and a flag) and a valid surrogate-pair escape
        "id": "1004",
        "prompt": '["What should I name my new puppy? 🐶🐾"]',
        "response_a": '["How about Biscuit? 🍪 Or Mochi 🍡, Pickles 🥒 or Waffles 🧇! '
                      'A short name is easier to learn. 👨‍👩‍👧 family favourite: Luna 🌙. '
                      'Made in 🇯🇵? Try Hana."]',
        "response_b": '["Call her \\ud83d\\ude00 Smiley! 😀😀😀 Popular names include Luna, Max, Bella, Charlie, '
                      'Daisy and Milo."]',
    },
    {   # escaped lone surrogates (high without low; low alone) -> U+FFFD
        "id": "1005",
        "prompt": '["Write a haiku about autumn \\ud83d", "Now one about winter, please."]',
        "response_a": '["Crimson leaves drifting,\\nthe old maple lets them go,\\ncool wind hums softly. \\ud83d", '
                      '"White hush on the pond,\\na heron stands on one leg,\\nthe sky holds its breath."]',
        "response_b": '["Leaves fall \\udc00 down.", null]',
    },
    {   # turn-count mismatch: prompt has 2 turns, responses 1; the longest row
        "id": "1006",
        "prompt": '["Explain how photosynthesis works.", "Can you explain it for a ten-year-old?"]',
        "response_a": '["Photosynthesis is how plants turn light into chemical energy. Inside the chloroplasts, '
                      'chlorophyll absorbs mostly red and blue light, which is why leaves look green. The '
                      'light-dependent reactions split water, release oxygen and produce ATP and NADPH. The '
                      'Calvin cycle then uses that ATP and NADPH to fix carbon dioxide into sugars such as '
                      'glucose. For a ten-year-old: plants are like little kitchens that cook sugar from air, '
                      'water and sunshine."]',
        "response_b": '["Plants eat sunlight. 🌞"]',
    },
]

CASES = [
    # name, model, adapter, quant, double_quant, max_length
    ("gemma2_f32", "gemma2_f32", None, "none", False, 256),
    ("gemma2_f32_nf4", "gemma2_f32", None, "nf4", False, 256),
    ("gemma2_f32_nf4_dq", "gemma2_f32", None, "nf4", True, 256),
    ("gemma2_f32_len40", "gemma2_f32", None, "none", False, 40),
    ("gemma2_bf16_adapter", "gemma2_bf16_sharded", "gemma2_adapter", "none", False, 256),
    ("gemma2_bf16_adapter_nf4_dq", "gemma2_bf16_sharded", "gemma2_adapter", "nf4", True, 256),
    ("llama_f32", "llama_f32", None, "none", False, 256),
    ("llama_f32_nf4", "llama_f32", None, "nf4", False, 256),
    ("llama_bf16_adapter", "llama_bf16", "llama_adapter", "none", False, 256),
    ("llama_bf16_adapter_nf4_dq", "llama_bf16", "llama_adapter", "nf4", True, 256),
]


def nf4_dequant_ref(packed, absmax, shape):
    """code_nf4[nibble] * absmax[block] in f32 -- the arithmetic of bnb's CUDA kernel and of its
    torch "default" backend.  (bnb 0.50.2's CPU C++ dequantize_4bit takes an AVX-512 path when
    the last dim is a multiple of 16 and indexes absmax per row as if every row held a whole
    number of 64-blocks; for rows such as 96 or 80 wide that is wrong, so it is not used.)"""
    torch = _torch()
    import bitsandbytes.functional as bnbF

    code = bnbF.get_4bit_type("nf4", device="cpu").float()
    p = packed.reshape(-1).to(torch.int64)
    nib = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)   # high nibble = even element
    n = 1
    for d in shape:
        n *= d
    scale = absmax.float().repeat_interleave(64)[:n]
    return (code[nib[:n]] * scale).reshape(shape)


def nf4_absmax_ref(state, nested_rule="cpu"):
    """Per-block absmax of a bnb QuantState; nested: code_dynamic[q] * absmax2[block] + offset.
    nested_rule="cuda" re-derives q with the CUDA kernel's exact-nearest search instead of
    bnb's CPU grid (same offset and absmax2)."""
    torch = _torch()
    if not state.nested:
        return state.absmax.float()
    q = state.absmax.reshape(-1).to(torch.int64)
    if nested_rule == "cuda":
        q = torch.from_numpy(state.cuda_q.astype("int64"))
    a2 = state.state2.absmax.float().repeat_interleave(state.state2.blocksize)[: q.shape[0]]
    return state.state2.code.float()[q] * a2 + state.offset.float()


def nf4_roundtrip_(model, double_quant, nested_rule="cpu"):
    """Replace every q/k/v/o/gate/up/down projection weight of the base model by its NF4
    round trip: bitsandbytes quantize_4bit(W, 64, nf4, compress_statistics=double_quant), then
    dequantised in f32 -- what bnb's Linear4bit forward multiplies with.  Embeddings, norms,
    score and LoRA weights are untouched."""
    torch = _torch()
    import bitsandbytes.functional as bnbF

    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(mod, torch.nn.Linear):
                w = mod.weight.data
                q, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                              compress_statistics=double_quant)
                if double_quant:  # CPU grid vs exact-nearest nested codes (see the docstring)
                    import numpy as np

                    a2 = state.state2.absmax.float().numpy()
                    am = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")[1].absmax.numpy()
                    b2 = np.repeat(np.arange(a2.shape[0]), 256)[: am.shape[0]]
                    u = np.clip(((am - np.float32(state.offset.item())) * (np.float32(1) / a2)[b2]
                                 ).astype(np.float32), -1, 1)
                    state.cuda_q = _dquantize_cuda_rule(state.state2.code.float().numpy(), u)
                    if nested_rule == "cpu":
                        NESTED_GRID_DIFFS[0] += int((state.cuda_q != state.absmax.numpy()).sum())
                mod.weight.data = nf4_dequant_ref(q, nf4_absmax_ref(state, nested_rule), tuple(w.shape))
                n += 1
    return n


NESTED_GRID_DIFFS = [0]


def load_case_model(model_name, adapter, quant, double_quant, seed=0, nested_rule="cpu"):
    from peft import PeftModel

    model = load_seq_cls(FIX / model_name, seed=seed)
    if quant == "nf4":
        nf4_roundtrip_(model, double_quant, nested_rule)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, FIX / adapter).eval()
    return model


def forward_rows(model, ids_rows):
    """Sequence-classification logits at the last token, one row at a time (batch 1, no pad)."""
    torch = _torch()
    logits, probs = [], []
    with torch.no_grad():
        for ids in ids_rows:
            out = model(input_ids=torch.tensor([ids])).logits[0]
            lg = out.double()
            logits.append([float(x) for x in out.tolist()])
            probs.append([float(x) for x in torch.softmax(lg, dim=-1).tolist()])
    return logits, probs


def eos_of(model_dir):
    eos = json.loads((FIX / model_dir / "config.json").read_text())["eos_token_id"]
    return eos[0] if isinstance(eos, list) else eos


def _max_abs_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _gemma2_raw_attn_logit_max(model, ids_rows):
    """Largest |q.k * query_pre_attn_scalar^-0.5| over unmasked pairs, before soft-capping."""
    torch = _torch()
    import transformers.models.gemma2.modeling_gemma2 as mg

    seen = [0.0]
    orig = mg.eager_attention_forward

    def spy(module, query, key, value, attention_mask, scaling=None, softcap=None, **kw):
        k = mg.repeat_kv(key, module.num_key_value_groups)
        raw = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            raw = raw.masked_fill(attention_mask[..., : k.shape[-2]] < -1e30, 0.0)
        seen[0] = max(seen[0], float(raw.abs().max()))
        return orig(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kw)

    mg.eager_attention_forward = spy
    try:
        forward_rows(model, ids_rows)
    finally:
        mg.eager_attention_forward = orig
    return seen[0]


def feature_checks(tok, ids_by_model):
    """How much each architectural feature moves the reference logits (printed; also stored)."""
    torch = _torch()
    from transformers import AutoModelForSequenceClassification

    def load(d, **over):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(
            FIX / d, num_labels=3, dtype=torch.float32, attn_implementation="eager", **over).eval()

    notes = {}
    ids = ids_by_model["gemma2_f32"]
    base, _ = forward_rows(load("gemma2_f32"), ids)
    raw_max = _gemma2_raw_attn_logit_max(load("gemma2_f32"), ids)
    no_cap, _ = forward_rows(load("gemma2_f32", attn_logit_softcapping=None), ids)
    no_win, _ = forward_rows(load("gemma2_f32", sliding_window=4096), ids)
    notes["gemma2_softcap"] = {"max_raw_attn_logit": raw_max, "cap": 3.0,
                               "max_logit_change_without_softcap": _max_abs_diff(base, no_cap)}
    notes["gemma2_sliding_window"] = {"max_logit_change_without_window": _max_abs_diff(base, no_win)}
    assert raw_max > 3.0 and notes["gemma2_softcap"]["max_logit_change_without_softcap"] > 1e-2
    assert notes["gemma2_sliding_window"]["max_logit_change_without_window"] > 1e-2
    print(f"[check] gemma2 softcap: max raw attention logit {raw_max:.2f} > cap 3.0; "
          f"removing the cap moves logits by up to {notes['gemma2_softcap']['max_logit_change_without_softcap']:.3f}")
    print(f"[check] gemma2 sliding window 16: removing it moves logits by up to "
          f"{notes['gemma2_sliding_window']['max_logit_change_without_window']:.3f}")

    # llama3 RoPE scaling: which inverse frequencies change, and the effect on the logits
    m = load("llama_f32")
    inv = m.model.rotary_emb.inv_freq.double()
    hd = LLAMA_DIMS["head_dim"]
    inv0 = 1.0 / (LLAMA_ROPE_THETA ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    changed = [i for i in range(hd // 2) if abs(float(inv[i] / inv0[i]) - 1) > 1e-6]
    detail = [(i, float(inv0[i]), float(inv[i]), 200 * float(inv0[i] - inv[i])) for i in range(hd // 2)]
    ids_l = ids_by_model["llama_f32"]
    base_l, _ = forward_rows(m, ids_l)
    no_scale, _ = forward_rows(load("llama_f32", rope_scaling={"rope_type": "default",
                                                              "rope_theta": LLAMA_ROPE_THETA}), ids_l)
    notes["llama3_rope"] = {"changed_inv_freq_indices": changed,
                            "max_logit_change_without_scaling": _max_abs_diff(base_l, no_scale)}
    print(f"[check] llama3 scaling changes inv_freq entries {changed} of {hd // 2}:")
    for i, a, b, dphi in detail:
        print(f"        i={i}: {a:.6g} -> {b:.6g}  (phase shift at position 200: {dphi:.3f} rad)")
    print(f"        removing llama3 scaling moves logits by up to "
          f"{notes['llama3_rope']['max_logit_change_without_scaling']:.3f}")
    assert notes["llama3_rope"]["max_logit_change_without_scaling"] > 1e-2
    return notes


def lora_effect(model, ids_rows):
    """Max logit change when every LoRA scaling is set to 0 (score head kept)."""
    scalings = []
    for mod in model.modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            scalings.append((mod, mod.scaling["default"]))
    with_lora, _ = forward_rows(model, ids_rows)
    for mod, _s in scalings:
        mod.scaling["default"] = 0.0
    without, _ = forward_rows(model, ids_rows)
    for mod, s in scalings:
        mod.scaling["default"] = s
    return _max_abs_diff(with_lora, without), sorted({s for _m, s in scalings})


def gen_cases(tok, versions):
    ids_cache, f32_vs_f64_max_prob_diff, nested_diffs = {}, {}, {}
    cases, summary = [], []
    for name, model_dir, adapter, quant, dq, max_length in CASES:
        eos = eos_of(model_dir)
        ids_rows = [encode_concat(tok, r, max_length, eos) for r in CASE_ROWS]
        ids_cache.setdefault(model_dir, ids_rows)
        NESTED_GRID_DIFFS[0] = 0
        model = load_case_model(model_dir, adapter, quant, dq, seed=0)
        if dq:
            nested_diffs[name] = NESTED_GRID_DIFFS[0]
        logits, probs = forward_rows(model, ids_rows)
        extra = ""
        if adapter is not None:
            # the score head must come from the adapter, not from the random init
            other = load_case_model(model_dir, adapter, quant, dq, seed=12345)
            _, probs2 = forward_rows(other, ids_rows)
            assert probs2 == probs, f"{name}: outputs depend on the random score init"
            eff, sc = lora_effect(model, ids_rows)
            assert eff > 1e-2, (name, eff)
            spec = ADAPTERS[adapter]  # alpha/r, or alpha/sqrt(r) with rsLoRA
            want = spec["lora_alpha"] / (spec["r"] ** 0.5 if spec["use_rslora"] else spec["r"])
            assert all(abs(s - want) < 1e-12 for s in sc), (sc, want)
            extra = f"LoRA scaling {sc}, LoRA moves logits by {eff:.3f}; score head from adapter"
        if quant == "nf4":
            ref = next(c for c in cases if c["model"] == model_dir and c["adapter"] == adapter
                       and c["quant"] == "none" and c["max_length"] == max_length)
            extra += f" NF4 moves logits by {_max_abs_diff(ref['logits'], logits):.4f}"
        case = {"name": name, "model": model_dir, "adapter": adapter, "quant": quant,
                "double_quant": dq, "max_length": max_length, "input_ids": ids_rows,
                "probs": probs, "logits": logits}
        if dq:
            # the same reference with the nested absmax codes chosen by the CUDA kernel's rule
            # (exact nearest) instead of bnb's CPU grid; see the module docstring
            alt = load_case_model(model_dir, adapter, quant, dq, seed=0, nested_rule="cuda")
            case["logits_cuda_nested"], case["probs_cuda_nested"] = forward_rows(alt, ids_rows)
            extra += (f"; CUDA-rule nested codes move probs by "
                      f"{_max_abs_diff(probs, case['probs_cuda_nested']):.1e}")
        cases.append(case)
        _, probs64 = forward_rows(model.double(), ids_rows)
        f32_vs_f64_max_prob_diff[name] = _max_abs_diff(probs, probs64)
        feats = ("softcap+sliding16+GQA4:2" if model_dir.startswith("gemma2")
                 else "GQA4:1+llama3-rope")
        feats += "+lora" if adapter else ""
        feats += ("+nf4" + ("+dq" if dq else "")) if quant == "nf4" else ""
        feats += f"+trunc{max_length}" if any(len(r) == max_length for r in ids_rows) else ""
        summary.append((name, max(abs(x) for r in logits for x in r),
                        [len(r) for r in ids_rows], feats, extra.strip()))
    notes = feature_checks(tok, ids_cache)
    notes["f32_vs_f64_max_prob_diff"] = f32_vs_f64_max_prob_diff
    notes["nf4_nested_codes_differing_from_exact_nearest"] = nested_diffs
    print(f"[check] f32 reference vs the same forward in f64: max prob diff "
          f"{max(f32_vs_f64_max_prob_diff.values()):.2e}")
    print(f"[check] nested (double-quant) absmax codes in the model weights where bnb's CPU grid "
          f"differs from the exact nearest code: {nested_diffs}")
    doc = {
        "generator": versions,
        "text_rule": ("concat: cells json-decoded, lone surrogates -> U+FFFD, null -> '', turns joined "
                      "by ' '; text = '<prompt>: ' + P + '\\n\\n<response_a>: ' + A + "
                      "'\\n\\n<response_b>: ' + B; ids = encode(text, add_special_tokens=True)"
                      "[:max_length-1] + [eos] (first eos if a list)"),
        "reference": ("transformers eager attention, float32 (bf16 weights upcast), batch 1, no padding, "
                      "logits of the sequence-classification head at the last token, probs = softmax in "
                      "float64; nf4: every q/k/v/o/gate/up/down weight of the base model replaced by "
                      "bitsandbytes dequantize_4bit(quantize_4bit(W, blocksize=64, nf4, "
                      "compress_statistics=double_quant)) before the f32 forward (dequantised as "
                      "code[nibble]*absmax in f32, the CUDA/default-backend arithmetic); double-quant "
                      "cases also carry logits_cuda_nested/probs_cuda_nested: the nested absmax codes "
                      "chosen by the CUDA kernel's exact-nearest rule instead of bnb's CPU 65536-point grid"),
        "feature_checks": notes,
        "rows": CASE_ROWS,
        "cases": cases,
    }
    (FIX / "cases.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary, notes


# ----------------------------------------------------------------------------------------------
# 7. NF4 ground truth (tests/fixtures/nf4.safetensors)
# ----------------------------------------------------------------------------------------------
# Per tensor tI: tI.input (original dtype), tI.packed (u8, flattened, as bnb returns it),
# tI.absmax (f32), tI.dequant (f32: dequantize_4bit with dtype float32), and with
# compress_statistics=True: tI.dq.qabsmax (u8), tI.dq.absmax2 (f32), tI.dq.offset (f32 [1]),
# tI.dq.dequant (f32).  bf16/f16 inputs also get tI.dequant_native (dequantize_4bit in the
# input dtype, i.e. the f32 product rounded to nearest-even).  Plus code_nf4 [16] and
# code_dynamic [256].  The packed/absmax of the double-quant run equal the plain run's.
# tI.cuda.packed / tI.cuda.dq.qabsmax: the same under the CUDA kernels' rules (all-zero block ->
# nibble 0 instead of 7; nested code = exact nearest instead of the CPU's 65536-point grid).
# They differ from the CPU values only in t1 (its zero block) and t5 (3 nested codes).

def decimal_to_f32(text):
    """The f32 nearest to a decimal literal, rounded once (as the C/CUDA compiler reads
    `0.5016634166240692f`). np.float32(float(text)) rounds twice (decimal -> f64 -> f32), which
    for some literals lands on the other f32 neighbour; the H200 run confirmed the kernel uses
    the once-rounded values."""
    from fractions import Fraction

    import numpy as np

    x = Fraction(text)
    near = np.float32(float(x))
    candidates = [near, np.nextafter(near, np.float32(-2)), np.nextafter(near, np.float32(2))]
    return float(min(candidates, key=lambda c: abs(Fraction(float(c)) - x)))


NF4_MIDPOINT_TREE = [  # CUDA dQuantizeNF4 thresholds, as written in csrc/kernels.cu
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def nf4_inputs():
    """The input tensors (seeded), with the edge cases placed in t1."""
    torch = _torch()
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(777)
    code = bnbF.get_4bit_type("nf4", device="cpu").float()
    mids = (code[:-1] + code[1:]) / 2
    t1 = torch.randn(96, 64, generator=g) * 0.05
    flat = t1.view(-1)
    flat[0:64] = 0.0                                  # block 0: all zeros
    blk = flat[64:128]                                # block 1: exactly +-absmax, several times
    blk[3], blk[10], blk[40] = 0.09, -0.09, 0.09
    blk.clamp_(-0.09, 0.09)
    blk = flat[128:192]                               # block 2: absmax 1.0, values ON the midpoints
    blk.zero_()
    blk[0] = 1.0
    blk[1:16] = mids
    blk[16:31] = -mids.flip(0)
    blk[31] = -1.0
    blk = flat[192:256]                               # block 3: absmax 2.0 (exact reciprocal), 2*midpoints
    blk.copy_(torch.rand(64, generator=g) * 1.8 - 0.9)
    blk[0] = -2.0
    blk[1:16] = 2 * mids
    flat[256:320] = 1e-30 * torch.randn(64, generator=g)  # block 4: tiny values (subnormal-ish scale)
    return {
        "t0": torch.randn(64, 64, generator=g) * 0.02,
        "t1": t1,
        "t2": torch.randn(33, 7, generator=g),                                   # 231 elements
        "t3": (torch.randn(128, 96, generator=g) * 0.1).to(torch.bfloat16),
        "t4": (torch.randn(40, 80, generator=g) * 3.0).to(torch.float16),
        "t5": torch.randn(300, 300, generator=g) * 0.03,                          # 1407 blocks
    }


def _dquantize_cuda_rule(code, x):
    """numpy emulation of CUDA dQuantize<0>: binary search from pivot 127 + midpoint test."""
    import numpy as np

    code = code.astype(np.float32)
    x = x.astype(np.float32)
    n = x.shape[0]
    pivot = np.full(n, 127)
    upper_pivot = np.full(n, 255)
    lower_pivot = np.zeros(n, dtype=np.int64)
    lower = np.full(n, -1.0, dtype=np.float32)
    upper = np.full(n, 1.0, dtype=np.float32)
    val = code[pivot]
    i = 64
    while i > 0:
        gt = x > val
        lower_pivot = np.where(gt, pivot, lower_pivot)
        lower = np.where(gt, val, lower)
        upper_pivot = np.where(gt, upper_pivot, pivot)
        upper = np.where(gt, upper, val)
        pivot = np.where(gt, pivot + i, pivot - i)
        val = code[pivot]
        i //= 2
    upper = np.where(upper_pivot == 255, code[255], upper)
    lower = np.where(lower_pivot == 0, code[0], lower)
    gt = x > val
    mid_up = ((upper + val) * np.float32(0.5)).astype(np.float32)
    mid_lo = ((lower + val) * np.float32(0.5)).astype(np.float32)
    return np.where(gt, np.where(x > mid_up, upper_pivot, pivot),
                    np.where(x < mid_lo, lower_pivot, pivot)).astype(np.uint8)


def _quantize_cpu_grid(code, u):
    """numpy emulation of bnb's CPU 8-bit quantiser (csrc/cpu_ops.cpp quantize_cpu_impl) for
    already-scaled values u: clamp to [-1,1]; grid index i = uint16((u+1)*0.5*65535 + 0.5)
    (f32 arithmetic, truncation); lut[i] = number of f32 midpoints 0.5*(code[k]+code[k+1])
    that are < -1 + 2i/65535.  Checked against bnb on every nested block below."""
    import numpy as np

    code = code.astype(np.float32)
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * np.arange(65536, dtype=np.float32)) / np.float32(65535))
    lut = np.searchsorted(mids, grid.astype(np.float32), side="left")
    u = np.clip(u.astype(np.float32), -1, 1)
    idx = ((u + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)).astype(np.uint16)
    return lut[idx].astype(np.uint8)


def _nf4_reference_nibbles(x, absmax):
    """Exact-nearest NF4 nibbles with the CUDA rule (reciprocal, x > threshold, NaN -> 0)."""
    import numpy as np

    n = x.shape[0]
    blocks = np.repeat(np.arange(absmax.shape[0]), 64)[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        recip = (np.float32(1.0) / absmax.astype(np.float32)).astype(np.float32)
        u = (x.astype(np.float32) * recip[blocks]).astype(np.float32)
    thr = np.array([decimal_to_f32(repr(t)) for t in NF4_MIDPOINT_TREE], dtype=np.float32)
    q = (u[:, None] > thr[None, :]).sum(axis=1).astype(np.uint8)  # NaN compares false -> 0
    return q


def gen_nf4():
    torch = _torch()
    import numpy as np
    import bitsandbytes.functional as bnbF
    from safetensors.torch import save_file

    code_nf4 = bnbF.get_4bit_type("nf4", device="cpu").float()
    mids = ((code_nf4[:-1] + code_nf4[1:]) / 2).numpy()
    thr = np.array([decimal_to_f32(repr(t)) for t in NF4_MIDPOINT_TREE], dtype=np.float32)
    # The kernel's literals, rounded once to f32 (decimal_to_f32), differ from torch's f32
    # midpoints by one ulp at four of the fifteen thresholds; t1 puts values on both.
    assert list(np.nonzero(mids != thr)[0]) == [0, 8, 12, 14], "NF4 thresholds changed"
    out = {"code_nf4": code_nf4.contiguous()}
    report = []
    code_dyn = None
    for name, x in nf4_inputs().items():
        shape, dtype = tuple(x.shape), x.dtype
        q, st = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
        qd, sd = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(q, qd)
        deq = nf4_dequant_ref(q, st.absmax, shape)
        deq_dq = nf4_dequant_ref(qd, nf4_absmax_ref(sd), shape)
        # what bnb's own CPU kernels return (compared below, not stored)
        bnb_cpu = torch.ops.bitsandbytes.dequantize_4bit(q, st.absmax, 64, "nf4", shape, torch.float32)
        bnb_nested = bnbF.dequantize_blockwise(sd.absmax, sd.state2) + sd.offset
        assert torch.equal(bnb_nested.float(), nf4_absmax_ref(sd)), name
        code_dyn = sd.state2.code.float()
        out[f"{name}.input"] = x.contiguous()
        out[f"{name}.packed"] = q.reshape(-1).contiguous()
        out[f"{name}.absmax"] = st.absmax.float().contiguous()
        out[f"{name}.dequant"] = deq.float().contiguous()
        if dtype != torch.float32:
            out[f"{name}.dequant_native"] = deq.to(dtype).contiguous()
        out[f"{name}.dq.qabsmax"] = sd.absmax.reshape(-1).contiguous()
        out[f"{name}.dq.absmax2"] = sd.state2.absmax.float().contiguous()
        out[f"{name}.dq.offset"] = sd.offset.float().reshape(1).contiguous()
        out[f"{name}.dq.dequant"] = deq_dq.float().contiguous()

        # ---- independent checks (numpy) ----
        xf = x.float().reshape(-1).numpy()
        n = xf.shape[0]
        am = st.absmax.float().numpy()
        ref_am = np.array([np.abs(xf[i:i + 64]).max() for i in range(0, n, 64)], dtype=np.float32)
        assert np.array_equal(am, ref_am), name
        packed = q.reshape(-1).numpy()
        nib = np.empty(packed.shape[0] * 2, dtype=np.uint8)
        nib[0::2], nib[1::2] = packed >> 4, packed & 0xF         # high nibble = even element
        cn = code_nf4.numpy()
        blocks = np.repeat(np.arange(am.shape[0]), 64)[:n]
        ref_deq = (cn[nib[:n]] * am[blocks]).astype(np.float32)
        assert np.array_equal(ref_deq, deq.reshape(-1).numpy()), name
        native_ok = bool(torch.equal(bnb_cpu.float(), deq))  # bnb's CPU C++ dequant kernel
        cuda_rule = _nf4_reference_nibbles(xf, am)
        nib_diff = int((cuda_rule != nib[:n]).sum())
        zero_blocks = int((am == 0).sum())
        # nested statistics
        qa, a2 = sd.absmax.numpy(), sd.state2.absmax.float().numpy()
        off = np.float32(sd.offset.item())
        cd = code_dyn.numpy()
        v = (am - off).astype(np.float32)
        b2 = np.repeat(np.arange(a2.shape[0]), 256)[: v.shape[0]]
        u = np.clip((v * (np.float32(1.0) / a2)[b2]).astype(np.float32), -1, 1)
        exact = _dquantize_cuda_rule(cd, u)
        dq_diff = int((exact != qa).sum())
        assert np.array_equal(_quantize_cpu_grid(cd, u), qa), f"{name}: CPU grid emulation is off"
        am_dq = (cd[qa] * a2[b2] + off).astype(np.float32)
        ref_deq_dq = (cn[nib[:n]] * am_dq[blocks]).astype(np.float32)
        assert np.array_equal(ref_deq_dq, deq_dq.reshape(-1).numpy()), name
        # the same quantities under the CUDA kernels' rules (emulated here; the H200 ground truth
        # in nf4_cuda.safetensors, from --cuda-ground-truth, agrees): zero blocks give nibble 0,
        # ties on a threshold go down, nested codes are the exact nearest.
        # an odd element count pads with the value 0.0, i.e. nibble 7, in the last low nibble
        cq = np.concatenate([cuda_rule, np.full(cuda_rule.shape[0] % 2, 7, dtype=np.uint8)])
        out[f"{name}.cuda.packed"] = torch.from_numpy(((cq[0::2] << 4) | cq[1::2]).astype(np.uint8))
        out[f"{name}.cuda.dq.qabsmax"] = torch.from_numpy(exact.astype(np.uint8))
        report.append((name, shape, str(dtype).replace("torch.", ""), am.shape[0], a2.shape[0],
                       zero_blocks, nib_diff, dq_diff, native_ok))
    out["code_dynamic"] = code_dyn.contiguous()
    path = FIX / "nf4.safetensors"
    # one metadata key only: safetensors writes a multi-key metadata map in random order
    save_file(out, str(path), metadata={"generator": "scripts/gen_fixtures.py (bitsandbytes nf4, "
                                                     "blocksize 64, nested blocksize 256)"})
    print(f"[nf4] {path.relative_to(ROOT)}: {len(out)} tensors")
    print("      tensor shape        dtype     blocks nested zero-blk nibbles!=CUDA-rule "
          "qabsmax!=exact-nearest bnb-CPU-dequant-kernel-ok")
    for r in report:
        print(f"      {r[0]:6} {str(r[1]):12} {r[2]:9} {r[3]:6} {r[4]:6} {r[5]:8} {r[6]:18} {r[7]:22} {r[8]}")
    return report


def check_nf4_cuda(path=None, device="cuda"):
    """Recompute nf4.safetensors' quantities with bitsandbytes on CUDA and report differences.
    Needs only torch + bitsandbytes + safetensors (and a CUDA device).  device="cpu" runs the
    same comparisons against bnb's CPU path (a self-test of this checker)."""
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    path = Path(path or FIX / "nf4.safetensors")
    d = load_file(str(path))
    dev = torch.device(device)
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), bitsandbytes {bnb.__version__}, {where}")
    diffs = 0

    def cmp(label, got, want, exact=True):
        nonlocal diffs
        got, want = got.detach().cpu().reshape(-1), want.reshape(-1)
        if got.dtype == torch.uint8:
            bad = (got != want).nonzero().reshape(-1)
        else:
            bad = (got.float() != want.float()).nonzero().reshape(-1)
        if bad.numel() == 0:
            print(f"   {label:34} identical ({want.numel()})")
            return
        diffs += 1
        ex = ", ".join(f"[{i}] {got[i].item()!r} vs {want[i].item()!r}" for i in bad[:4].tolist())
        extra = ""
        if got.dtype != torch.uint8:
            extra = f", max |diff| {(got.float() - want.float()).abs().max().item():.3g}"
        print(f"   {label:34} {bad.numel()} of {want.numel()} differ{extra}: {ex}")

    cmp("code_nf4", F.get_4bit_type("nf4", device=dev), d["code_nf4"])
    cmp("code_dynamic", F.create_dynamic_map().to(dev), d["code_dynamic"])
    names = sorted({k.split(".")[0] for k in d if k.startswith("t") and k.endswith(".input")})
    for name in names:
        x = d[f"{name}.input"]
        shape = tuple(x.shape)
        print(f"{name} {shape} {x.dtype}")
        q, st = F.quantize_4bit(x.to(dev), blocksize=64, quant_type="nf4", compress_statistics=False)
        cmp("packed vs CPU", q, d[f"{name}.packed"])
        cmp("packed vs cuda-rule emulation", q, d[f"{name}.cuda.packed"])
        cmp("absmax", st.absmax, d[f"{name}.absmax"])
        packed = d[f"{name}.packed"].to(dev).reshape(-1, 1)
        absmax = d[f"{name}.absmax"].to(dev)
        deq = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", shape, torch.float32)
        cmp("dequant (stored packed, f32)", deq, d[f"{name}.dequant"])
        if f"{name}.dequant_native" in d:
            deqn = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", shape, x.dtype)
            cmp(f"dequant_native ({x.dtype})", deqn, d[f"{name}.dequant_native"])
        qd, sd = F.quantize_4bit(x.to(dev), blocksize=64, quant_type="nf4", compress_statistics=True)
        cmp("dq.offset (mean of absmax)", sd.offset.reshape(1), d[f"{name}.dq.offset"])
        cmp("dq.qabsmax vs CPU", sd.absmax, d[f"{name}.dq.qabsmax"])
        cmp("dq.qabsmax vs cuda-rule emulation", sd.absmax, d[f"{name}.cuda.dq.qabsmax"])
        cmp("dq.absmax2", sd.state2.absmax, d[f"{name}.dq.absmax2"])
        # nested quantisation alone, fed with the stored absmax and offset
        v = d[f"{name}.absmax"].to(dev) - d[f"{name}.dq.offset"].to(dev)
        qb, s2 = F.quantize_blockwise(v, blocksize=256)
        cmp("nested(stored absmax) vs CPU", qb, d[f"{name}.dq.qabsmax"])
        cmp("nested(stored absmax) vs cuda-rule", qb, d[f"{name}.cuda.dq.qabsmax"])
        state2 = F.QuantState(absmax=d[f"{name}.dq.absmax2"].to(dev), code=d["code_dynamic"].to(dev),
                              blocksize=256, dtype=torch.float32)
        state = F.QuantState(absmax=d[f"{name}.dq.qabsmax"].to(dev), shape=shape, dtype=torch.float32,
                             blocksize=64, code=d["code_nf4"].to(dev), quant_type="nf4",
                             offset=d[f"{name}.dq.offset"].to(dev).reshape(()), state2=state2)
        cmp("dq.dequant (CPU state)", F.dequantize_4bit(packed, state), d[f"{name}.dq.dequant"])
    print("no differences" if diffs == 0 else f"{diffs} compared quantities differ (see above)")
    return 0


# ----------------------------------------------------------------------------------------------
# 8. Training parity (tests/fixtures/train_parity.json, train_{gemma2,llama}_{init,final}/)
# ----------------------------------------------------------------------------------------------
# A few AdamW steps from a fixed PEFT adapter, written out as the plain torch loop that the
# Hugging Face Trainer runs for these settings (read from transformers 5.24 trainer.py and
# optimization.py, torch 2.15 optim/adam.py and nn/utils/clip_grad.py):
#
#   for every optimiser step (no shuffling: micro-batches are consecutive rows):
#       lr_used = optimizer.param_groups[0]["lr"]          # what this step runs at
#       for each of grad_accum micro-batches of batch_size rows:
#           logits = model(input_ids, attention_mask).logits    # right-padded with pad id 0;
#                   # transformers' SeqCls head reads the last non-pad token of each row
#           loss = cross_entropy(logits, target_probs, label_smoothing=ls)   # mean over rows
#           (loss / grad_accum).backward()      # Trainer.training_step: the model computes no
#                   # loss itself, so the loss is divided by the accumulation steps
#       grad_norm = clip_grad_norm_(trainable, max_grad_norm)   # returns the PRE-clip norm;
#                   # grads *= min(max_grad_norm / (grad_norm + 1e-6), 1)
#       optimizer.step(); scheduler.step(); optimizer.zero_grad()
#
# Schedules (LambdaLR: lr = base_lr * f(k), k = number of scheduler.step() calls so far, so the
# optimiser step s = 1, 2, ... runs at f(s-1)):
#   linear:  f(k) = k / max(1, W)                                        if k < W
#            f(k) = max(0, (N - k) / max(1, N - W))                      otherwise
#   cosine:  f(k) = k / max(1, W)                                        if k < W
#            f(k) = max(0, 0.5 * (1 + cos(pi * 2 * 0.5 * (k - W) / max(1, N - W))))
#   (W = warmup_steps, N = number of optimiser steps; with W = 1 the first step runs at lr 0.)
#
# torch.optim.AdamW with foreach=None, fused=None on CPU tensors runs _single_tensor_adam (the
# foreach/fused defaults pick foreach only for cuda/xpu/mtia tensors).  Per tensor, in order:
#   step += 1
#   p *= 1 - lr * wd                                    (decoupled decay, before the moments)
#   m.lerp_(g, 1 - beta1)                               (m + (1-beta1) (g - m))
#   v = v * beta2 + (1 - beta2) * g * g                 (mul_ then addcmul_)
#   bc1 = 1 - beta1**step, bc2 = 1 - beta2**step        (Python floats)
#   denom = sqrt(v) / sqrt(bc2) + eps
#   p += -(lr / bc1) * m / denom                        (addcdiv_ with value = -step_size)
# The Trainer's own default optimiser in transformers 5.24 is "adamw_torch_fused" (the same
# AdamW with fused=True); the run prints how far the fused and foreach variants land from the
# default implementation used here.

TRAIN_MAX_LENGTH = 160  # see gen_train_parity: at 64 every one of the 12 rows is cut to 64 ids
TRAIN_ROWS = 12
TRAIN_SOFT_LABELS = {3: [0.7, 0.2, 0.1], 8: [0.2, 0.3, 0.5]}  # row index -> soft label

TRAIN_CASES = [
    dict(name="gemma2_lora", model="gemma2_f32", quant="none", seed=707,
         init_adapter="train_gemma2_init", final_adapter="train_gemma2_final",
         lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                   target_modules=list(PROJECTIONS), layers_to_transform=[1, 2, 3]),
         hyper=dict(lr=2e-3, weight_decay=0.01, betas=[0.9, 0.999], eps=1e-8, batch_size=2,
                    grad_accum=2, max_grad_norm=0.05, scheduler="linear", warmup_steps=1,
                    epochs=1, label_smoothing=0.0, shuffle=False)),
    dict(name="llama_qlora", model="llama_f32", quant="nf4", seed=808,
         init_adapter="train_llama_init", final_adapter="train_llama_final",
         lora=dict(r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=True,
                   target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2]),
         hyper=dict(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, batch_size=3,
                    grad_accum=2, max_grad_norm=1.0, scheduler="cosine", warmup_steps=0,
                    epochs=1, label_smoothing=0.1, shuffle=False)),
]


def peft_key(param_name):
    """A PeftModel parameter name -> its key in adapter_model.safetensors (adapter name dropped,
    the modules_to_save copy saved under the plain module path)."""
    return param_name.replace(".modules_to_save.default", "").replace(".default", "")


def load_peft_strict(base, adapter_dir, is_trainable=False):
    """PeftModel.from_pretrained, failing loudly unless the adapter file and the model agree
    exactly.  Any warning during the load is an error (deprecation notices aside: transformers
    5.24 emits a FutureWarning about is_gradient_checkpointing on every trainable load).  That
    alone is not enough: PEFT 0.21.2 warns only about missing keys containing "lora_" and the
    adapter name, never about unexpected keys (e.g. a layer outside layers_to_transform, which it
    silently ignores), and a missing score key depends on the config (SEQ_CLS: a KeyError inside
    PEFT; no task_type: no modules_to_save, the base's or a random head stays).  So the score key
    is required up front, and afterwards the key sets and every loaded value are compared."""
    import warnings

    torch = _torch()
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    stored = load_file(str(adapter_dir / "adapter_model.safetensors"))
    if not any(k.endswith("score.weight") for k in stored):
        raise RuntimeError(f"{adapter_dir}: no score head in the adapter (modules_to_save); PEFT "
                           "would keep the base model's (or a random) head")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    live = get_peft_model_state_dict(model, save_embedding_layers=False)
    missing, unexpected = sorted(set(live) - set(stored)), sorted(set(stored) - set(live))
    if missing or unexpected:
        raise RuntimeError(f"{adapter_dir}: adapter keys do not fit the model: missing {missing}, "
                           f"unexpected {unexpected}")
    for k, v in stored.items():
        if not torch.equal(live[k].float(), v.float()):
            raise RuntimeError(f"{adapter_dir}: {k} was not loaded into the model")
    return model


def train_rows(tok, eos_id):
    """The first TRAIN_ROWS rows of assets/demo/train.csv: concat ids and label triples."""
    import csv

    with open(DEMO_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:TRAIN_ROWS]
    out = []
    for i, row in enumerate(rows):
        ids = encode_concat(tok, row, TRAIN_MAX_LENGTH, eos_id)
        assert 0 not in ids, "pad id 0 inside a row"
        label = TRAIN_SOFT_LABELS.get(i, [float(row[k]) for k in LABELS])
        assert abs(sum(label) - 1.0) < 1e-12, label
        out.append({"input_ids": ids, "label": label})
    return out


def make_train_init_adapter(case):
    """The fixed initial adapter: A kaiming-uniform (PEFT's init, a=sqrt(5), bound 1/sqrt(in)),
    B ~ N(0, 0.02) (not zero, so A gets gradients at step 1), score = the base checkpoint's
    score + N(0, 0.02); all from one seeded generator, parameters in sorted name order."""
    import math

    torch = _torch()
    from peft import LoraConfig, TaskType, get_peft_model

    lo = case["lora"]
    base = load_seq_cls(FIX / case["model"], seed=case["seed"])
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=lo["r"], lora_alpha=lo["lora_alpha"],
                     lora_dropout=lo["lora_dropout"], use_rslora=lo["use_rslora"],
                     target_modules=lo["target_modules"], layers_to_transform=lo["layers_to_transform"])
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(case["seed"])
    base_score = base.score.weight.detach().clone()
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if not p.requires_grad:
                continue
            if "lora_A" in pname:
                torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=g)
            elif "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "modules_to_save" in pname and "score" in pname:
                p.copy_(base_score + torch.randn(p.shape, generator=g) * 0.02)
            else:
                raise AssertionError(f"unexpected trainable parameter {pname}")
    keys, shapes, acfg = save_peft_adapter(model, case["init_adapter"], case["model"])
    assert acfg["modules_to_save"] == ["classifier", "score"], acfg["modules_to_save"]
    return keys, shapes


def load_train_model(case, adapter, is_trainable, dtype=None):
    """Base (f32, eager; NF4 round trip for quant nf4) + the adapter, strictly loaded."""
    torch = _torch()
    base = load_seq_cls(FIX / case["model"], seed=0)
    if case["quant"] == "nf4":
        n = nf4_roundtrip_(base, double_quant=False)
        assert n == 7 * base.config.num_hidden_layers, n
    model = load_peft_strict(base, FIX / adapter, is_trainable=is_trainable)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    return model


def batch_logits(model, ids_rows):
    """SeqCls logits of a right-padded batch (pad id 0, attention_mask 1 on real tokens)."""
    torch = _torch()
    width = max(len(r) for r in ids_rows)
    ids = torch.zeros(len(ids_rows), width, dtype=torch.long)
    mask = torch.zeros(len(ids_rows), width, dtype=torch.long)
    for i, r in enumerate(ids_rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return model(input_ids=ids, attention_mask=mask).logits


def micro_batch_loss(model, rows, label_smoothing, dtype, unpadded=False):
    """Mean soft-target cross entropy over the rows of one micro-batch.  unpadded: one forward
    per row instead of the padded batch (same loss up to rounding; used for the float64 run,
    where transformers' padded sliding-window layers produce NaN, see gen_train_parity)."""
    torch = _torch()
    import torch.nn.functional as F

    if unpadded:
        logits = torch.cat([batch_logits(model, [r["input_ids"]]) for r in rows])
    else:
        logits = batch_logits(model, [r["input_ids"] for r in rows])
    target = torch.tensor([r["label"] for r in rows], dtype=dtype)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


class true_float64:
    """Context manager: transformers' Gemma-2 / Llama code upcasts to float32, not to the
    activation dtype, in RMSNorm (x.float()) and in the eager attention softmax (dtype=float32),
    so model.double() alone still rounds to f32 there.  Inside this context both keep float64
    (RoPE angles stay f32, a constant of the positions), for the float64 comparison run."""

    def __enter__(self):
        torch = _torch()
        import torch.nn.functional as F
        from transformers.models.gemma2 import modeling_gemma2 as mg
        from transformers.models.llama import modeling_llama as ml

        def gemma_norm(mod, x):
            return mod._norm(x) * (1.0 + mod.weight)

        def llama_norm(mod, x):
            return mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))

        softmax = F.softmax

        def softmax_keep64(x, dim=None, _stacklevel=3, dtype=None):
            if x.dtype == torch.float64 and dtype == torch.float32:
                dtype = None
            return softmax(x, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

        self.saved = [(mg.Gemma2RMSNorm, "forward", mg.Gemma2RMSNorm.forward),
                      (ml.LlamaRMSNorm, "forward", ml.LlamaRMSNorm.forward), (F, "softmax", softmax)]
        mg.Gemma2RMSNorm.forward, ml.LlamaRMSNorm.forward, F.softmax = gemma_norm, llama_norm, softmax_keep64
        return self

    def __exit__(self, *exc):
        for obj, attr, value in self.saved:
            setattr(obj, attr, value)
        return False


def make_scheduler(opt, hyper, num_steps):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}
    return make[hyper["scheduler"]](opt, num_warmup_steps=hyper["warmup_steps"],
                                    num_training_steps=num_steps)


def train_loop(case, rows, dtype=None, unpadded=False, **adamw_kw):
    """The Trainer-equivalent loop above.  Returns (model, named trainable tensors by PEFT key,
    initial values, per-step records)."""
    torch = _torch()
    dtype = dtype or torch.float32
    h = case["hyper"]
    torch.manual_seed(case["seed"])
    model = load_train_model(case, case["init_adapter"], is_trainable=True, dtype=dtype)
    model.train()
    named = [(peft_key(n), p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    initial = {k: p.detach().clone() for k, p in named}
    opt = torch.optim.AdamW(params, lr=h["lr"], betas=tuple(h["betas"]), eps=h["eps"],
                            weight_decay=h["weight_decay"], **adamw_kw)
    bs, accum = h["batch_size"], h["grad_accum"]
    micro = [rows[i: i + bs] for i in range(0, len(rows), bs)]
    assert len(micro) % accum == 0 and h["epochs"] == 1 and not h["shuffle"]
    num_steps = len(micro) // accum
    sched = make_scheduler(opt, h, num_steps)
    steps = []
    for s in range(num_steps):
        lr_used = opt.param_groups[0]["lr"]
        losses = []
        for mb in micro[s * accum: (s + 1) * accum]:
            loss = micro_batch_loss(model, mb, h["label_smoothing"], dtype, unpadded)
            (loss / accum).backward()
            losses.append(float(loss.detach()))
        norm = float(torch.nn.utils.clip_grad_norm_(params, h["max_grad_norm"]))
        opt.step()
        sched.step()
        opt.zero_grad()
        steps.append({"step": s + 1, "lr": lr_used, "loss": sum(losses) / len(losses),
                      "micro_losses": losses, "grad_norm": norm,
                      "clipped": h["max_grad_norm"] / (norm + 1e-6) < 1.0})
    return model, named, initial, steps


def first_micro_batch_gradient(case, rows, grad_keys):
    """Loss and gradient of the first micro-batch's mean loss (NOT divided by grad_accum) at the
    initial adapter, before any optimiser step."""
    torch = _torch()
    h = case["hyper"]
    torch.manual_seed(case["seed"])
    model = load_train_model(case, case["init_adapter"], is_trainable=True)
    model.train()
    loss = micro_batch_loss(model, rows[: h["batch_size"]], h["label_smoothing"], torch.float32)
    loss.backward()
    loss = loss.detach()
    grads = {peft_key(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    return {
        "rows": list(range(h["batch_size"])),
        "note": "gradient of the micro-batch's mean loss itself (not divided by grad_accum), at the "
                "initial adapter, before any optimiser step",
        "loss": float(loss),
        "grad_total_norm": total,
        "grad_norms": {k: float(g.double().norm()) for k, g in sorted(grads.items())},
        "grads": {k: grads[k].tolist() for k in grad_keys},
    }


def _dump_compact(doc):
    """json with indent 1, but every list of plain numbers on one line."""
    import re

    text = json.dumps(doc, indent=1)
    return re.sub(r"\[\s*([-+0-9.eE,\s]*?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def gen_train_parity(vers):
    """tests/fixtures/train_parity.json and the adapters train_{gemma2,llama}_{init,final}/.

    max_length: the first 12 rows of train.csv are all longer than 64 tokens (only row 7 has
    exactly 64 ids), so at max_length 64 no micro-batch would contain padding.  At
    TRAIN_MAX_LENGTH = 160 rows 7, 8 and 11 are shorter (64, 141, 136 ids), so the right padding,
    the attention mask and the last-non-pad-token gather are exercised in 3 of the 6 gemma2
    micro-batches and 2 of the 4 llama ones."""
    import contextlib

    torch = _torch()
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(FIX / "gemma2_f32" / "tokenizer.json"))
    doc = {"generator": vers, "reference": None, "cases": []}
    for case in TRAIN_CASES:
        name, h = case["name"], case["hyper"]
        rows = train_rows(tok, eos_of(case["model"]))
        init_keys, shapes = make_train_init_adapter(case)

        # padded batches give the same logits as one row at a time without padding
        check = load_train_model(case, case["init_adapter"], is_trainable=False)
        with torch.no_grad():
            padded = batch_logits(check, [r["input_ids"] for r in rows])
        single, _ = forward_rows(check, [r["input_ids"] for r in rows])
        pad_diff = float((padded - torch.tensor(single)).abs().max())
        assert pad_diff < 1e-4, (name, pad_diff)

        model, named, initial, steps = train_loop(case, rows)
        # loaded from the init adapter, whose base_model_name_or_path is the relative fixture name;
        # PEFT's save would look that up on the Hub (no network here): point it at the dir
        model.peft_config["default"].base_model_name_or_path = str(FIX / case["model"])
        assert sorted(k for k, _ in named) == init_keys, "trainable tensors != adapter keys"
        final_keys, _, _ = save_peft_adapter(model, case["final_adapter"], case["model"])
        assert final_keys == init_keys
        final = load_file(str(FIX / case["final_adapter"] / "adapter_model.safetensors"))
        for k, p in named:
            assert torch.equal(final[k], p.detach()), k
        update_norms = {k: float((final[k].double() - initial[k].double()).norm()) for k in init_keys}

        # the saved final adapter, reloaded by PEFT, predicts the rows like this (batch 1, no pad)
        reloaded = load_train_model(case, case["final_adapter"], is_trainable=False)
        _, final_probs = forward_rows(reloaded, [r["input_ids"] for r in rows])

        # how far other implementations land (printed only): AdamW foreach / fused, one forward
        # per row instead of padded batches, and float64 (unpadded: in float64 transformers'
        # padded batches give NaN -- a pad query of a sliding layer whose keys are all masked gets
        # an all -inf row, and 0 * NaN then spreads through the value matmul of the next layer;
        # float32 stays finite and exact there)
        alt = {}
        for label, kw in (("foreach", dict(foreach=True)), ("fused", dict(fused=True)),
                          ("unpadded", dict(unpadded=True)),
                          ("float64", dict(dtype=torch.float64, unpadded=True))):
            with true_float64() if label == "float64" else contextlib.nullcontext():
                _m, named_alt, init_alt, steps_alt = train_loop(case, rows, **kw)
            rel = max(float(((p.detach().double() - init_alt[k].double())
                             - (final[k].double() - initial[k].double())).norm()) / update_norms[k]
                      for k, p in named_alt)
            dl = max(abs(a["loss"] - b["loss"]) for a, b in zip(steps, steps_alt))
            alt[label] = (dl, rel)

        entry = {
            "name": name, "model": case["model"], "quant": case["quant"],
            "init_adapter": case["init_adapter"], "final_adapter": case["final_adapter"],
            "lora": case["lora"],
            "hyper": dict(h, max_length=TRAIN_MAX_LENGTH, format="concat"),
            "rows": rows,
            "steps": steps,
            "update_norms": update_norms,
            "final_probs": final_probs,
            "noise_floor": {"float64_max_loss_diff": alt["float64"][0],
                            "float64_max_rel_update_err": alt["float64"][1]},
        }
        if name == "gemma2_lora":
            entry["first_micro_batch"] = first_micro_batch_gradient(case, rows, [
                "base_model.model.score.weight",
                "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"])
            fmb = entry["first_micro_batch"]
            assert abs(fmb["loss"] - steps[0]["micro_losses"][0]) < 1e-6
        doc["cases"].append(entry)

        print(f"[train] {name}: {case['model']} quant {case['quant']}, {len(init_keys)} trainable tensors "
              f"({sum(math_prod(shapes[k][1]) for k in init_keys)} values), row lengths "
              f"{[len(r['input_ids']) for r in rows]}; padded vs unpadded logits {pad_diff:.1e}")
        for st in steps:
            print(f"        step {st['step']}: lr {st['lr']:.6g}  loss {st['loss']:.7f}  micro "
                  f"{[round(x, 7) for x in st['micro_losses']]}  pre-clip norm {st['grad_norm']:.6f} "
                  f"(max {h['max_grad_norm']}: {'clipped' if st['clipped'] else 'not clipped'})")
        rel_sizes = [update_norms[k] / float(initial[k].double().norm()) for k in init_keys]
        print(f"        |final - init| / |init| per tensor: {min(rel_sizes):.2e} .. {max(rel_sizes):.2e}")
        for label, (dl, rel) in alt.items():
            print(f"        vs AdamW default (single-tensor, f32): {label:8} max |dloss| {dl:.1e}, "
                  f"max rel update err {rel:.1e}")
    doc["reference"] = (
        "plain torch loop equal to the Hugging Face Trainer for these settings (see "
        "scripts/gen_fixtures.py section 8): micro-batches of consecutive rows, right padding with "
        "id 0 + attention_mask, transformers SeqCls logits at the last non-pad token (eager "
        "attention, f32), loss = torch cross_entropy with probability targets and label_smoothing "
        "(mean over the micro-batch), backward on loss/grad_accum, clip_grad_norm_ over all "
        "trainable tensors (grad_norm = the pre-clip norm), torch.optim.AdamW default "
        "(single-tensor) implementation, then scheduler.step(); lr = the lr the step ran at; "
        "loss = mean of the micro-batch losses; nf4: every q/k/v/o/gate/up/down weight of the base "
        "replaced by its bitsandbytes NF4 round trip (blocksize 64, no double quant) before "
        "training; update_norms = Frobenius norm of final - initial per adapter tensor; "
        "final_probs = softmax (f64) of the reloaded final adapter's logits, one row at a time")
    path = FIX / "train_parity.json"
    path.write_text(_dump_compact(doc) + "\n")
    print(f"[train] {path.relative_to(ROOT)}: {path.stat().st_size / 1e3:.0f} kB; adapters "
          f"{total_size([FIX / c[k] for c in TRAIN_CASES for k in ('init_adapter', 'final_adapter')]) / 1e3:.0f} kB")
    for case in TRAIN_CASES:
        keys = sorted(load_file(str(FIX / case["final_adapter"] / "adapter_model.safetensors")))
        print(f"        {case['final_adapter']} keys: " + ", ".join(keys))
    return doc


def math_prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------
# 9. Checking an adapter written by the engine (--check-engine-adapter)
# ----------------------------------------------------------------------------------------------

def check_engine_adapter(adapter_dir, model_dir, quant="none", double_quant=False, ids_json=None):
    """Load ADAPTER_DIR with PEFT's own PeftModel.from_pretrained on MODEL_DIR (f32, eager;
    NF4 round trip of the projections with --quant nf4) and print one JSON line per row:
    {"row", "probs", "logits"} (batch 1, no padding).  Rows: a JSON list of token-id lists, or
    by default the rows of tests/fixtures/train_parity.json (the case whose model matches).
    Exits non-zero, loudly, if PEFT warns or the adapter's keys and the model's differ."""
    _torch()  # single-threaded, as for the fixtures
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    if not model_dir.exists() and (FIX / model_dir).exists():
        model_dir = FIX / model_dir
    if ids_json:
        ids_rows = json.loads(Path(ids_json).read_text())
    else:
        cases = json.loads((FIX / "train_parity.json").read_text())["cases"]
        case = next((c for c in cases if c["model"] == model_dir.name), cases[0])
        ids_rows = [r["input_ids"] for r in case["rows"]]
    assert all(isinstance(r, list) and r and all(isinstance(i, int) for i in r) for r in ids_rows), \
        "ids JSON must be a list of non-empty token-id lists"
    base = load_seq_cls(model_dir, seed=0)
    if quant == "nf4":
        n = nf4_roundtrip_(base, double_quant)
        print(f"nf4 round trip on {n} projection weights (double_quant {double_quant})", file=sys.stderr)
    try:
        model = load_peft_strict(base, adapter_dir).eval()
    except Exception as e:  # warnings were turned into errors inside
        print(f"ERROR: PEFT did not load {adapter_dir} cleanly: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    logits, probs = forward_rows(model, ids_rows)
    for i, (lg, pr) in enumerate(zip(logits, probs)):
        print(json.dumps({"row": i, "probs": pr, "logits": lg}))
    return 0


# ----------------------------------------------------------------------------------------------
# CUDA ground truth (run on a GPU machine; the outputs are committed as fixtures)
# ----------------------------------------------------------------------------------------------

def cuda_ground_truth(out_dir):
    """bitsandbytes' CUDA kernels as the ground truth the engine's NF4 must equal.

    Writes into out_dir:
    - nf4_cuda.safetensors: for every input tI of nf4.safetensors, what bitsandbytes' CUDA
      kernels produce: tI.packed, tI.absmax, tI.dequant (f32), and with compress_statistics
      tI.dq.qabsmax, tI.dq.absmax2, tI.dq.offset, tI.dq.dequant (f32); plus code_dynamic as
      created on that machine.
    - cases_cuda.json: for every case of cases.json, the probabilities of the same model run
      by transformers with bitsandbytes' own Linear4bit layers on CUDA (BitsAndBytesConfig nf4,
      double quant as the case says, compute dtype float32, TF32 off), or plain f32 on CUDA for
      unquantised cases -- the end-to-end reference a QLoRA user actually gets.
    Needs torch, transformers, peft, accelerate, bitsandbytes and a CUDA device."""
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    d = load_file(str(FIX / "nf4.safetensors"))
    out = {"code_dynamic": F.create_dynamic_map().float().contiguous()}
    names = sorted({k.split(".")[0] for k in d if k.startswith("t") and k.endswith(".input")})
    for name in names:
        x = d[f"{name}.input"].to(dev)
        shape = tuple(x.shape)
        q, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
        st.dtype = torch.float32
        out[f"{name}.packed"] = q.reshape(-1).cpu().contiguous()
        out[f"{name}.absmax"] = st.absmax.float().cpu().contiguous()
        out[f"{name}.dequant"] = F.dequantize_4bit(q, st).float().reshape(shape).cpu().contiguous()
        qd, sd = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        sd.dtype = torch.float32
        out[f"{name}.dq.qabsmax"] = sd.absmax.reshape(-1).cpu().contiguous()
        out[f"{name}.dq.absmax2"] = sd.state2.absmax.float().cpu().contiguous()
        out[f"{name}.dq.offset"] = sd.offset.float().reshape(1).cpu().contiguous()
        out[f"{name}.dq.dequant"] = F.dequantize_4bit(qd, sd).float().reshape(shape).cpu().contiguous()
    save_file(out, str(out_dir / "nf4_cuda.safetensors"),
              metadata={"generator": f"scripts/gen_fixtures.py --cuda-ground-truth (bitsandbytes {bnb.__version__}, "
                                     f"torch {torch.__version__}, {torch.cuda.get_device_name(0)})"})
    print(f"[cuda] nf4_cuda.safetensors: {len(out)} tensors")

    import transformers
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    transformers.logging.set_verbosity_error()
    cases = json.loads((FIX / "cases.json").read_text())
    result = {"generator": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "bitsandbytes": bnb.__version__, "device": torch.cuda.get_device_name(0)},
              "cases": {}}
    for case in cases["cases"]:
        kw = dict(num_labels=3, dtype=torch.float32, attn_implementation="eager", device_map={"": 0})
        if case["quant"] == "nf4":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=case["double_quant"],
                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["score"])
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(FIX / case["model"], **kw).eval()
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        if case["adapter"]:
            model = PeftModel.from_pretrained(model, FIX / case["adapter"]).eval()
        logits, probs = [], []
        with torch.no_grad():
            for ids in case["input_ids"]:
                lg = model(input_ids=torch.tensor([ids], device=dev)).logits[0].float().cpu()
                logits.append([float(v) for v in lg.tolist()])
                probs.append([float(v) for v in torch.softmax(lg.double(), -1).tolist()])
        ref = case.get("probs_cuda_nested", case["probs"])
        dp = max(abs(a - b) for ra, rb in zip(probs, ref) for a, b in zip(ra, rb))
        print(f"[cuda] {case['name']:28} Linear4bit layers {n4:3}  max|dp| vs CPU fixture {dp:.2e}")
        result["cases"][case["name"]] = {"logits": logits, "probs": probs, "linear4bit_layers": n4}
        del model
        torch.cuda.empty_cache()
    (out_dir / "cases_cuda.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"[cuda] cases_cuda.json: {len(result['cases'])} cases")
    return 0


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def versions():
    import platform

    import bitsandbytes
    import numpy
    import peft
    import safetensors
    import tokenizers
    import torch
    import transformers

    return {"script": "scripts/gen_fixtures.py", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__, "numpy": numpy.__version__}


def total_size(paths):
    n = 0
    for p in paths:
        n += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-nf4-cuda", action="store_true",
                    help="recompute tests/fixtures/nf4.safetensors with bitsandbytes on CUDA and report differences")
    ap.add_argument("--nf4-file", default=None, help="nf4.safetensors to check (default: tests/fixtures/)")
    ap.add_argument("--check-device", default="cuda", help=argparse.SUPPRESS)  # "cpu": self-test
    ap.add_argument("--cuda-ground-truth", metavar="OUT_DIR", default=None,
                    help="on a GPU: write nf4_cuda.safetensors and cases_cuda.json (bitsandbytes CUDA) into OUT_DIR")
    ap.add_argument("--check-engine-adapter", metavar="ADAPTER_DIR", default=None,
                    help="load ADAPTER_DIR (e.g. written by `engine train`) with PEFT on --model and print "
                         "per-row probabilities as JSON lines; fails on any key mismatch")
    ap.add_argument("--model", metavar="MODEL_DIR", default=None,
                    help="base model dir for --check-engine-adapter (a path or a tests/fixtures name)")
    ap.add_argument("--quant", choices=["none", "nf4"], default="none",
                    help="--check-engine-adapter: NF4 round trip of the base's projections")
    ap.add_argument("--double-quant", action="store_true",
                    help="--check-engine-adapter with --quant nf4: compress_statistics")
    ap.add_argument("--ids-json", metavar="FILE", default=None,
                    help="--check-engine-adapter: JSON list of token-id lists (default: the rows of "
                         "tests/fixtures/train_parity.json)")
    args = ap.parse_args()
    if args.check_engine_adapter:
        if not args.model:
            ap.error("--check-engine-adapter needs --model MODEL_DIR")
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        return check_engine_adapter(args.check_engine_adapter, args.model, args.quant,
                                    args.double_quant, args.ids_json)
    if args.cuda_ground_truth:
        return cuda_ground_truth(args.cuda_ground_truth)
    if args.check_nf4_cuda:
        return check_nf4_cuda(args.nf4_file, args.check_device)

    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    _torch()
    vers = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if k != "script"))

    rows = make_train_rows()
    write_train_csv(rows)
    tok = train_tokenizer(rows)
    FIX.mkdir(parents=True, exist_ok=True)
    gen_gemma2_f32()
    gen_gemma2_bf16_sharded()
    gen_llama_f32()
    gen_llama_bf16()
    for name in ADAPTERS:
        gen_adapter(name)
    gen_nf4()
    summary, notes = gen_cases(tok, vers)
    gen_train_parity(vers)

    print("\nsummary")
    print(f"  {'case':28} {'max|logit|':>10}  {'ids per row':29} {'exercises':42} notes")
    for name, mx, lens, feats, extra in summary:
        print(f"  {name:28} {mx:10.4f}  {str(lens):29} {feats:42} {extra}")
    sc = notes["gemma2_softcap"]
    print(f"  gemma2: softcap active (raw attention logits up to {sc['max_raw_attn_logit']:.1f} vs cap 3.0; "
          f"logits move {sc['max_logit_change_without_softcap']:.3f} without it); sliding window 16 active "
          f"(rows up to {max(max(r[2]) for r in summary)} ids; logits move {notes['gemma2_sliding_window']['max_logit_change_without_window']:.3f} "
          f"without it); GQA 4:2; head_dim 24, q width 96 != hidden 64; query_pre_attn_scalar 32")
    print(f"  llama: GQA 4:1; llama3 scaling changes inv_freq {notes['llama3_rope']['changed_inv_freq_indices']}, "
          f"logits move {notes['llama3_rope']['max_logit_change_without_scaling']:.3f} without it")
    paths = [DEMO_CSV, TOKENIZER_JSON, FIX]
    print(f"  sizes: tests/fixtures {total_size([FIX]) / 1e6:.2f} MB, assets {total_size([DEMO_CSV, TOKENIZER_JSON]) / 1e3:.0f} kB, "
          f"total {total_size(paths) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
