"""Response lengths: ShareGPT token counts (sharegpt), the length predictor (predictor, features,
data, eval, metrics) and the length-inflation model fitted on generations (inflation, its report)."""
