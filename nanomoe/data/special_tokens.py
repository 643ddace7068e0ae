"""The four special tokens every nanomoe tokenizer holds, with ids 0..3 when trained here.

    <|endoftext|>  separates documents (in raw text files and in the token files; starts generation)
    <|unknown|>    word tokenizer: a character never seen in training (BPE never needs it)
    <|im_start|>   chat turns, for fine-tuning later
    <|im_end|>
"""

EOT = "<|endoftext|>"
UNKNOWN = "<|unknown|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOT, UNKNOWN, IM_START, IM_END)
