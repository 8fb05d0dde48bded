"""Layer 2: models as objects. Asset resolver, chat-template encoding, the reward model (heads,
fine-tuning modes, save/load), decoder maths and the shared bottom store, batched scoring,
sampling and log-probs. Nothing here trains.
"""
