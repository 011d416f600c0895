"""The ground floor: type aliases, errors, trees, argument checks, schedules, printing, donation,
the foreach-or-per-tensor math, step counters, the transform record and the protocol itself."""
