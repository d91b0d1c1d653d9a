//! Examples of the sandbox SDK; each `[[example]]` of this package is a template to copy.
