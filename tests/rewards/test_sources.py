"""rewards/sources.py: hub ids and local paths are told apart in one place."""


def test_hub_ids_are_told_from_local_paths_in_one_place():
    from rewards.sources import is_hub_id

    for name in ("google/flan-t5-base", "facebook/roberta-hate-speech-dynabench-r4-target", "t5-small", "a_b/c.d-e"):
        assert is_hub_id(name), name
    for name in ("./model", "/abs/dir", "~/m", "a/b/c", "../x", ".hidden/x", "owner/.x", "", "a b/c"):
        assert not is_hub_id(name), name
    assert is_hub_id("knkarthick/dialogsum", require_owner=True) and not is_hub_id("dialogsum", require_owner=True)
