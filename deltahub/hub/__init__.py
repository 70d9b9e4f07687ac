"""deltahub.hub"""
