"""The offline tasks, each generated from a seed: politeness (the default pipeline's) and
arithmetic word problems (a verifiable reward)."""
