from hypothesis import settings

# `pytest --hypothesis-profile ci` fuzzes every losscmp check with 1000 cases
# (unless a check says how many it wants); `pytest --losscmp-replay-only` replays the
# saved cases alone, in seconds.
settings.register_profile("ci", max_examples=1000)
