"""Which parameters a transform or penalty touches: parameter trees from modules, selections that
print as tables, selectors, ``decay_mask``, and masks resolved once per structure."""
