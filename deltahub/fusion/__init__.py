"""deltahub.fusion"""
