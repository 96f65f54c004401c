from hypothesis import settings

# `pytest --hypothesis-profile ci` fuzzes every losscmp check with 1000 cases (unless a
# check says how many it wants).  On a CI machine Hypothesis loads its `ci` profile by
# itself, so a plain `pytest` there does the same; `pytest --losscmp-replay-only`
# replays the saved cases alone, in seconds.  Parented on Hypothesis' own `ci` profile,
# as its documentation shows, so that profile's other settings are kept.
settings.register_profile("ci", settings.get_profile("ci"), max_examples=1000)
