"""JSON Patch (RFC 6902) — the examples of its Appendix A, and the errors FHIR PATCH maps to 400/422."""

import pytest

from mappings.fhir.jsonpatch import PatchError, apply_patch

CASES = [  # (document, patch, expected) from RFC 6902 Appendix A
    ({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}], {"baz": "qux", "foo": "bar"}),
    ({"foo": ["bar", "baz"]}, [{"op": "add", "path": "/foo/1", "value": "qux"}], {"foo": ["bar", "qux", "baz"]}),
    ({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
    ({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}], {"foo": ["bar", "baz"]}),
    ({"baz": "qux", "foo": "bar"}, [{"op": "replace", "path": "/baz", "value": "boo"}], {"baz": "boo", "foo": "bar"}),
    ({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
     [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
     {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
    ({"foo": ["all", "grass", "cows", "eat"]}, [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
     {"foo": ["all", "cows", "eat", "grass"]}),
    ({"baz": "qux", "foo": ["a", 2, "c"]},
     [{"op": "test", "path": "/baz", "value": "qux"}, {"op": "test", "path": "/foo/1", "value": 2}],
     {"baz": "qux", "foo": ["a", 2, "c"]}),
    ({"foo": "bar"}, [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
     {"foo": "bar", "child": {"grandchild": {}}}),
    ({"foo": ["bar"]}, [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}], {"foo": ["bar", ["abc", "def"]]}),
    ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}], {"/": 9, "~1": 10}),
    ({"foo": "bar"}, [{"op": "copy", "from": "/foo", "path": "/baz"}], {"foo": "bar", "baz": "bar"}),
]


@pytest.mark.parametrize("doc,patch,expected", CASES)
def test_rfc6902_examples(doc, patch, expected):
    before = repr(doc)
    assert apply_patch(doc, patch) == expected
    assert repr(doc) == before  # the input is not changed


@pytest.mark.parametrize("doc,patch,kind", [
    ({"baz": "qux"}, [{"op": "test", "path": "/baz", "value": "bar"}], "test"),
    ({"n": 1}, [{"op": "test", "path": "/n", "value": True}], "test"),  # a boolean is not a number
    ({"foo": "bar"}, [{"op": "add", "path": "/baz/bat", "value": "qux"}], "invalid"),
    ({"foo": [1]}, [{"op": "add", "path": "/foo/5", "value": 2}], "invalid"),
    ({"foo": [1]}, [{"op": "replace", "path": "/foo/01", "value": 2}], "invalid"),
    ({"foo": 1}, [{"op": "remove", "path": "/bar"}], "invalid"),
    ({"foo": 1}, [{"op": "move", "from": "/foo", "path": "/foo/x"}], "invalid"),
    ({"foo": 1}, [{"op": "add", "path": "foo", "value": 1}], "invalid"),
    ({"foo": 1}, [{"op": "add", "path": "/x"}], "invalid"),
    ({"foo": 1}, [{"op": "replace", "path": "", "value": [1]}], "invalid"),
    ({"foo": 1}, {"op": "add"}, "invalid"),
    ({"foo": 1}, ["add"], "invalid"),
])
def test_errors(doc, patch, kind):
    with pytest.raises(PatchError) as info:
        apply_patch(doc, patch)
    assert info.value.kind == kind
