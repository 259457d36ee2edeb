"""The harness the tests and the benchmark share: an in-memory CaseBook, private servers."""
