"""rloo"""
