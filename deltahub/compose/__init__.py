"""deltahub.compose"""
