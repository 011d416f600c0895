"""Classifying what an optimizer's decay does (coupled, decoupled, norm-dependent) by measuring it."""
