namespace KernelLM.Models.Llama;

/// <summary>
/// cos/sin tables [positions, head_dim / 2] for RoPE, built the way transformers builds them:
/// inv_freq[i] = 1 / theta^(2i / head_dim) in fp32, rescaled for "linear" and "llama3" rope_scaling,
/// angle = fp32(position) * inv_freq[i] in fp32, then cos and sin.
/// </summary>
public static class RopeTable
{
    public static float[] InverseFrequencies(ModelConfig config)
    {
        int half = config.HeadDim / 2;
        var inverse = new float[half];
        for (int i = 0; i < half; i++)
        {
            float exponent = (float)(2 * i) / config.HeadDim;
            inverse[i] = 1f / MathF.Pow((float)config.RopeTheta, exponent);
        }
        var scaling = config.RopeScaling;
        if (scaling is null)
        {
            return inverse;
        }
        if (scaling.Type == "linear")
        {
            for (int i = 0; i < half; i++)
            {
                inverse[i] /= (float)scaling.Factor;
            }
            return inverse;
        }
        // llama3: long wavelengths divided by factor, short ones kept, a smooth blend in between.
        double lowWavelength = scaling.OriginalMaxPositions / scaling.LowFrequencyFactor;
        double highWavelength = scaling.OriginalMaxPositions / scaling.HighFrequencyFactor;
        for (int i = 0; i < half; i++)
        {
            double frequency = inverse[i];
            double wavelength = 2 * Math.PI / frequency;
            double scaled = wavelength > lowWavelength ? frequency / scaling.Factor : frequency;
            bool medium = !(wavelength < highWavelength) && !(wavelength > lowWavelength);
            if (medium)
            {
                double smooth = (scaling.OriginalMaxPositions / wavelength - scaling.LowFrequencyFactor) /
                                (scaling.HighFrequencyFactor - scaling.LowFrequencyFactor);
                scaled = (1 - smooth) * scaled / scaling.Factor + smooth * scaled;
            }
            inverse[i] = (float)scaled;
        }
        return inverse;
    }

    public static (float[] Cos, float[] Sin) Build(ModelConfig config, int positions)
    {
        float[] inverse = InverseFrequencies(config);
        int half = inverse.Length;
        var cos = new float[(long)positions * half];
        var sin = new float[(long)positions * half];
        for (int p = 0; p < positions; p++)
        {
            for (int i = 0; i < half; i++)
            {
                float angle = p * inverse[i];
                cos[(long)p * half + i] = (float)Math.Cos(angle);
                sin[(long)p * half + i] = (float)Math.Sin(angle);
            }
        }
        return (cos, sin);
    }
}
