"""Chat with any checkpoint: `python scripts/chat.py runs/tiny/ppo/final [--temperature 0.7 ...]`.

Type a message and press Enter; /reset forgets the conversation, /quit (or Ctrl-D) ends it.
Bytes of a line that do not decode (not UTF-8, say) read as the replacement character U+FFFD.
"""

import argparse
import sys

from jaxrlhf.chat import ChatSession
from jaxrlhf.config import SamplingSection
from jaxrlhf.errors import JaxRLHFError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an HF-layout GPT-2 or Llama folder (e.g. a stage's final/) or a hub name")
    parser.add_argument("--user-prefix", default="Request: ", help="without a chat template: before each message")
    parser.add_argument("--bot-prefix", default="Reply:", help="without a chat template: before each reply")
    parser.add_argument("--max-prompt-tokens", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat-template", action="store_true",
                        help="write turns with the prefixes even if the tokenizer has a chat template")
    args = parser.parse_args(argv)
    try:
        sampling = SamplingSection(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   greedy=args.greedy)
        session = ChatSession(args.checkpoint, sampling, args.user_prefix, args.bot_prefix, args.seed,
                              chat_template=not args.no_chat_template)
    except JaxRLHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # A line that is not UTF-8 (a terminal in another encoding, pasted binary) would end the session
    # with a UnicodeDecodeError: its bad bytes read as U+FFFD instead, and the session goes on.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    interactive = sys.stdin.isatty()
    while True:
        try:
            message = input("you> " if interactive else "")
        except EOFError:
            return 0
        if message.strip() == "/quit":
            return 0
        if message.strip() == "/reset":
            session.reset()
            print("(conversation forgotten)")
            continue
        print(f"bot> {session.reply(message)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
