"""svdprune_utils"""
