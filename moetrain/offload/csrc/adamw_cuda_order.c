/* AdamW over flat fp32 host tensors, in the order and rounding of torch's fused CUDA AdamW kernel.
 *
 * The reference every expert tier is compared with is torch.optim.AdamW(fused=True) on CUDA, whose kernel
 * (ATen/native/cuda/fused_adam_utils.cuh, adam_math) works in fp32 with explicit fused multiply-adds:
 *
 *     param      = param - (lr * wd) * param                     (contracted to one fma by nvcc)
 *     exp_avg    = fma(beta1, exp_avg, fma(-beta1, grad, grad))
 *     exp_avg_sq = fma(beta2, exp_avg_sq, fma(-beta2, g2, g2))     g2 = grad * grad, rounded
 *     denom      = sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
 *     param      = param - (step_size * exp_avg) / denom          step_size = lr / bias_correction1
 *
 * Every operation is IEEE-754 single precision and correctly rounded (fma, sqrt and division are on the
 * device and here), so this loop gives the kernel's bits wherever it gets the same scalars. Compile with
 * -ffp-contract=off: the compiler must not fuse what the device kernel rounds separately.
 */
#include <math.h>
#include <stdint.h>

void adamw_cuda_order(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n,
                      float lr, float beta1, float beta2, float weight_decay, float eps,
                      float bias_correction1, float bias_correction2_sqrt, int threads) {
    const float lr_wd = lr * weight_decay;
    const float step_size = lr / bias_correction1;
    const int decay = weight_decay != 0.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float p = param[i];
        const float g = grad[i];
#ifdef ADAMW_DECAY_UNFUSED  /* probes only: the decay's product rounded before the subtraction */
        if (decay) p = p - lr_wd * p;
#else
        if (decay) p = fmaf(-lr_wd, p, p);
#endif
        const float m = fmaf(beta1, exp_avg[i], fmaf(-beta1, g, g));
        const float g2 = g * g;
        const float v = fmaf(beta2, exp_avg_sq[i], fmaf(-beta2, g2, g2));
        const float denom = sqrtf(v) / bias_correction2_sqrt + eps;
        param[i] = p - (step_size * m) / denom;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}

/* 1 - beta ** step and sqrt(1 - beta2 ** step) in fp32, as the kernel forms them from its fp32 step count. */
void adamw_bias_corrections(float beta1, float beta2, float step, float *out) {
    out[0] = 1.0f - powf(beta1, step);
    out[1] = sqrtf(1.0f - powf(beta2, step));
}
